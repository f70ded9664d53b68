//! The TOML configuration: typed model, defaults, and validation that reports every error at once.
//!
//! The file is read into a `toml::Table` and walked by hand instead of through
//! `#[derive(Deserialize)]` with `deny_unknown_fields`: serde stops at the first problem, and
//! `sluice check` must name every bad key (with its path) in one run. Unknown keys are errors all
//! the same.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use toml::{Table, Value};

mod cql;
mod discovery;
mod lifecycle;
mod postgres;

pub use cql::CqlConfig;
pub use discovery::{Discovery, DnsDiscovery, DnsLookup, KubernetesDiscovery, PortRef, RoleLabels};
pub use lifecycle::{ReloadConfig, ShutdownConfig};
pub use postgres::PostgresConfig;

/// `auth_query` when not set: the role's verifier from `pg_shadow` (readable by superusers; a
/// SECURITY DEFINER function is the least-privilege alternative).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// The listen address of the admin listener when `[admin]` is absent: localhost only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9930";

/// The configuration sluice runs with when started without `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"
# Embedded default: a PostgreSQL primary on 127.0.0.1:5432 and, if there is one, a streaming
# replica on 127.0.0.1:5433 (roles are found by asking each node). Clients log in as
# postgres/postgres; sluice uses the same credentials towards the servers.
[admin]
listen = "127.0.0.1:9930"

[[clusters]]
name = "local"
protocol = "postgres"
listen = "127.0.0.1:6432"
pool_mode = "transaction"

[clusters.discovery]
static = ["127.0.0.1:5432", "127.0.0.1:5433"]

[[clusters.users]]
name = "postgres"
password = "postgres"
"#;

/// A whole sluice configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    pub reload: ReloadConfig,
    pub shutdown: ShutdownConfig,
    pub clusters: Vec<ClusterConfig>,
}

/// `[admin]`: the HTTP listener for metrics, health and topology, and who may use the admin
/// console (the virtual database `sluice` on the PostgreSQL listeners).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Users (of a PostgreSQL cluster) with full console access.
    pub admin_users: Vec<String>,
    /// Users (of a PostgreSQL cluster) that may run the console's SHOW commands.
    pub stats_users: Vec<String>,
    /// How long `PAUSE` holds a client's new transaction before failing it with 57P03.
    pub pause_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            pause_timeout: DEFAULT_PAUSE_TIMEOUT,
        }
    }
}

/// `[admin] pause_timeout` when not set.
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// `[runtime]`: the async runtime sluice runs on (read at start; a reload cannot change it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Runtime threads (one single-threaded runtime each); `None`: one per CPU sluice may use.
    pub threads: Option<usize>,
}

/// The wire protocol a cluster speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    Cql,
}

/// How long a client keeps its backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// The backend returns to the pool at the end of each transaction.
    Transaction,
    /// The client keeps one primary backend for its whole session.
    Session,
}

/// Where reads may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Any healthy replica.
    Eventual,
    /// After a client's write commits, its reads go only to replicas that have replayed it.
    ReadYourWrites,
    /// Everything to the primary.
    Primary,
}

/// How sluice connects to backends (libpq's `sslmode` values of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without checking its certificate; else plain.
    Prefer,
    /// TLS or nothing, without checking the certificate.
    Require,
    /// TLS with the certificate checked against `backend_tls_ca` and the host name.
    VerifyFull,
}

/// How the nodes of a cluster relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyKind {
    /// One primary takes writes; replicas take reads.
    PrimaryReplica,
    /// Every healthy node takes reads and writes (CockroachDB, YugabyteDB YSQL).
    MultiActive,
}

/// `[[clusters]]`: one database cluster behind one listener. The keys every protocol takes
/// are fields here; the ones only one protocol takes are in [`ProtocolConfig`], so a key that
/// does not apply cannot be read by mistake (and is an error naming it when configured).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// The zone sluice runs in: nodes in it are preferred.
    pub zone: Option<String>,
    pub max_client_connections: usize,
    pub connect_timeout: Duration,
    pub login_timeout: Duration,
    /// PEM certificate chain and key presented to clients (PostgreSQL: after SSLRequest; CQL:
    /// TLS from the first byte).
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse clients that do not use TLS.
    pub require_tls: bool,
    /// PEM CA certificates that client certificates must chain to; when set, a TLS client
    /// must present one.
    pub tls_client_ca: Option<std::path::PathBuf>,
    pub backend_tls: BackendTlsMode,
    /// PEM CA certificates for `backend_tls = "verify-full"`.
    pub backend_tls_ca: Option<std::path::PathBuf>,
    pub probe_interval: Duration,
    pub discovery: Discovery,
    pub users: Vec<UserConfig>,
    /// `protocol` and the settings only that protocol has.
    pub settings: ProtocolConfig,
}

/// The settings of one protocol: `protocol = "postgres"` with the PostgreSQL keys of
/// `[[clusters]]`, or `protocol = "cql"` with `[clusters.cql]`.
#[derive(Debug, Clone, PartialEq)]
pub enum ProtocolConfig {
    Postgres(PostgresConfig),
    Cql(CqlConfig),
}

impl ClusterConfig {
    pub fn protocol(&self) -> Protocol {
        match self.settings {
            ProtocolConfig::Postgres(_) => Protocol::Postgres,
            ProtocolConfig::Cql(_) => Protocol::Cql,
        }
    }

    /// The PostgreSQL settings, if this is a PostgreSQL cluster.
    pub fn postgres(&self) -> Option<&PostgresConfig> {
        match &self.settings {
            ProtocolConfig::Postgres(p) => Some(p),
            ProtocolConfig::Cql(_) => None,
        }
    }

    /// The CQL settings, if this is a CQL cluster.
    pub fn cql(&self) -> Option<&CqlConfig> {
        match &self.settings {
            ProtocolConfig::Cql(c) => Some(c),
            ProtocolConfig::Postgres(_) => None,
        }
    }
}

/// `[[clusters.users]]`: a user clients may log in as.
#[derive(Clone, PartialEq)]
pub struct UserConfig {
    pub name: String,
    /// Clients authenticate to sluice with it; sluice uses it towards the backends.
    pub password: String,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One problem in a configuration file: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Parses and validates a whole file, collecting every error.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                reason: format!("invalid TOML: {}", e.to_string().trim()),
            }])
        })?;
        let mut errors = Vec::new();
        let declared;
        let config = {
            let mut root = Fields::new(table, String::new(), &mut errors);
            let admin = match root.take_table("admin") {
                Some(t) => {
                    let mut f = root.child(t, "admin".into());
                    let listen = f.socket_addr("listen", DEFAULT_ADMIN_LISTEN);
                    let admin_users = f.string_array("admin_users");
                    let stats_users = f.string_array("stats_users");
                    let pause_timeout = f.duration("pause_timeout", "30s");
                    f.finish();
                    AdminConfig {
                        listen,
                        admin_users: admin_users.unwrap_or_default(),
                        stats_users: stats_users.unwrap_or_default(),
                        pause_timeout: pause_timeout.unwrap_or(DEFAULT_PAUSE_TIMEOUT),
                    }
                }
                None => AdminConfig::default(),
            };
            let runtime = match root.take_table("runtime") {
                Some(t) => {
                    let mut f = root.child(t, "runtime".into());
                    let threads = if f.has("threads") {
                        f.integer("threads", 1, 1, 1024)
                    } else {
                        None
                    };
                    f.finish();
                    RuntimeConfig { threads }
                }
                None => RuntimeConfig::default(),
            };
            let reload = lifecycle::parse_reload(&mut root);
            let shutdown = lifecycle::parse_shutdown(&mut root);
            let tables = root.take_array_of_tables("clusters");
            if tables.is_empty() {
                root.error("clusters", "at least one [[clusters]] entry is required");
            }
            declared = tables.len();
            let clusters = tables
                .into_iter()
                .enumerate()
                .filter_map(|(i, t)| {
                    let f = root.child(t, format!("clusters[{i}]"));
                    parse_cluster(f)
                })
                .collect::<Vec<_>>();
            root.finish();
            Config {
                admin,
                runtime,
                reload,
                shutdown,
                clusters,
            }
        };
        // Cross-cluster rules name clusters by position: only meaningful when every cluster
        // parsed (the per-cluster errors come first; these follow once they are fixed).
        if config.clusters.len() == declared {
            validate_whole(&config, &mut errors);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Errors for the parts of a valid file that this build cannot run yet.
    /// (Nothing at the moment: CQL clusters take static, Kubernetes and DNS discovery.)
    pub fn unsupported(&self) -> Vec<ConfigError> {
        Vec::new()
    }
}

fn parse_cluster(mut f: Fields<'_>) -> Option<ClusterConfig> {
    let name = f.string("name", None);
    let protocol = f.choice(
        "protocol",
        None,
        &[("postgres", Protocol::Postgres), ("cql", Protocol::Cql)],
    );
    let listen = f.socket_addr_required("listen");
    // The PostgreSQL keys are read (or, on a CQL cluster, refused by name) here, before the
    // common keys, as they always were.
    let postgres = if protocol == Some(Protocol::Cql) {
        postgres::refuse(&mut f);
        None
    } else {
        postgres::parse_postgres(&mut f)
    };
    let zone = f.optional_string("zone");
    let max_client_connections = f.integer("max_client_connections", 10_000, 1, 1_000_000);
    let connect_timeout = f.duration("connect_timeout", "3s");
    let login_timeout = f.duration("login_timeout", "10s");
    let tls_cert = f.optional_path("tls_cert");
    let tls_key = f.optional_path("tls_key");
    let require_tls = f.boolean("require_tls", false);
    let tls_client_ca = f.optional_path("tls_client_ca");
    let backend_tls_given = f.has("backend_tls");
    let backend_tls = f.choice(
        "backend_tls",
        Some(BackendTlsMode::Prefer),
        &[
            ("disable", BackendTlsMode::Disable),
            ("prefer", BackendTlsMode::Prefer),
            ("require", BackendTlsMode::Require),
            ("verify-full", BackendTlsMode::VerifyFull),
        ],
    );
    let backend_tls_ca = f.optional_path("backend_tls_ca");
    // CQL has no STARTTLS-like negotiation: a node speaks TLS from the first byte or not at
    // all, so there is nothing to "prefer", and plain TCP is the default.
    let backend_tls = match (protocol, backend_tls) {
        (Some(Protocol::Cql), Some(BackendTlsMode::Prefer)) if backend_tls_given => {
            f.error(
                "backend_tls",
                "\"prefer\" needs a TLS negotiation that CQL does not have: use \"disable\", \"require\" or \"verify-full\"",
            );
            None
        }
        (Some(Protocol::Cql), Some(BackendTlsMode::Prefer)) => Some(BackendTlsMode::Disable),
        (_, mode) => mode,
    };
    if tls_client_ca.is_some() && tls_cert.is_none() {
        f.error("tls_client_ca", "needs tls_cert and tls_key");
    }
    if tls_cert.is_some() != tls_key.is_some() {
        f.error("tls_cert", "tls_cert and tls_key must be set together");
    }
    if require_tls == Some(true) && tls_cert.is_none() {
        f.error("require_tls", "needs tls_cert and tls_key");
    }
    if backend_tls == Some(BackendTlsMode::VerifyFull) && backend_tls_ca.is_none() {
        f.error("backend_tls", "\"verify-full\" needs backend_tls_ca");
    }
    // Load what will be used, so that `sluice check` catches a bad certificate or key.
    if let (Some(cert), Some(key)) = (&tls_cert, &tls_key) {
        if cert.is_file() && key.is_file() {
            if let Err(e) = crate::common::tls::acceptor(cert, key) {
                f.error("tls_cert", &e);
            }
        }
    }
    if let (Some(cert), Some(key), Some(ca)) = (&tls_cert, &tls_key, &tls_client_ca) {
        if cert.is_file() && key.is_file() && ca.is_file() {
            if let Err(e) = crate::common::tls::acceptor_verifying_clients(cert, key, ca) {
                f.error("tls_client_ca", &e);
            }
        }
    }
    if let (Some(mode), Some(ca)) = (backend_tls, &backend_tls_ca) {
        if ca.is_file() {
            if let Err(e) = crate::common::tls::BackendTls::new(mode, Some(ca)) {
                f.error("backend_tls_ca", &e);
            }
        }
    }
    let probe_interval = f.duration("probe_interval", "1s");
    let discovery = match f.take_table("discovery") {
        Some(t) => {
            let path = f.key_path("discovery");
            discovery::parse_discovery(f.child(t, path))
        }
        None => {
            f.error(
                "discovery",
                "is required ([clusters.discovery] with `static`, `kubernetes` or `dns`)",
            );
            None
        }
    };
    let users = f
        .take_array_of_tables("users")
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let path = f.key_path(&format!("users[{i}]"));
            let mut u = f.child(t, path);
            let name = u.string("name", None);
            let password = user_password(&mut u);
            if let Some(p) = password.as_deref().filter(|p| p.starts_with("SCRAM-SHA-256$")) {
                if protocol == Some(Protocol::Cql) {
                    u.error("password", "a SCRAM verifier works only for postgres clusters");
                } else if sluice_postgres::scram::ScramSecret::parse(p).is_none() {
                    u.error(
                        "password",
                        "is not a valid SCRAM-SHA-256 verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as pg_authid holds it)",
                    );
                }
            }
            if password.as_deref().is_some_and(sluice_postgres::md5::is_stored_hash)
                && protocol == Some(Protocol::Cql)
            {
                u.error("password", "an md5 hash works only for postgres clusters");
            }
            u.finish();
            Some(UserConfig {
                name: name?,
                password: password?,
            })
        })
        .collect::<Vec<_>>();
    let cql = cql::parse_cql(&mut f, protocol);
    f.finish();
    let settings = match protocol? {
        Protocol::Postgres => ProtocolConfig::Postgres(postgres?),
        Protocol::Cql => ProtocolConfig::Cql(cql?),
    };
    let cluster = ClusterConfig {
        name: name?,
        listen: listen?,
        zone,
        max_client_connections: max_client_connections?,
        connect_timeout: connect_timeout?,
        login_timeout: login_timeout?,
        tls_cert,
        tls_key,
        require_tls: require_tls?,
        tls_client_ca,
        backend_tls: backend_tls?,
        backend_tls_ca,
        probe_interval: probe_interval?,
        discovery: discovery?,
        users,
        settings,
    };
    Some(cluster)
}

/// A user's password from exactly one of `password`, `password_env` (an environment variable)
/// or `password_file` (a file, without one trailing newline). Errors never quote the secret.
fn user_password(u: &mut Fields<'_>) -> Option<String> {
    const KEYS: [&str; 3] = ["password", "password_env", "password_file"];
    let given: Vec<&str> = KEYS.into_iter().filter(|k| u.has(k)).collect();
    match given.as_slice() {
        [] => {
            u.error("password", "is required (or password_env, or password_file)");
            return None;
        }
        [_] => {}
        many => {
            u.error(
                "",
                &format!(
                    "set exactly one of password, password_env, password_file (found {})",
                    many.join(", ")
                ),
            );
            for k in KEYS {
                u.take(k);
            }
            return None;
        }
    }
    if u.has("password") {
        return u.string("password", None);
    }
    if let Some(var) = u.optional_string("password_env") {
        return match std::env::var(&var) {
            Ok(v) if v.is_empty() => {
                u.error("password_env", &format!("environment variable {var:?} is empty"));
                None
            }
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => {
                u.error(
                    "password_env",
                    &format!("environment variable {var:?} is not set"),
                );
                None
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                u.error(
                    "password_env",
                    &format!("environment variable {var:?} is not valid UTF-8"),
                );
                None
            }
        };
    }
    let path = u.optional_string("password_file")?;
    match read_secret_file(&path) {
        Ok(text) => {
            let secret = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text);
            if secret.is_empty() {
                u.error("password_file", &format!("{path:?} is empty"));
                None
            } else {
                Some(secret.to_string())
            }
        }
        Err(e) => {
            u.error("password_file", &format!("cannot read {path:?}: {e}"));
            None
        }
    }
}

/// Reads a small regular file: a secret file that is a device or a FIFO (`/dev/zero`, a pipe)
/// must fail validation, not hang or fill memory.
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    const MAX_SECRET_FILE: u64 = 64 * 1024;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(format!("larger than {MAX_SECRET_FILE} bytes"));
    }
    Ok(text)
}

/// Checks the whole-file rules that no single key can: unique names and listen addresses,
/// users present where probes need them, console users that exist.
fn validate_whole(config: &Config, errors: &mut Vec<ConfigError>) {
    for (key, names) in [
        ("admin_users", &config.admin.admin_users),
        ("stats_users", &config.admin.stats_users),
    ] {
        for (i, name) in names.iter().enumerate() {
            let known = config
                .clusters
                .iter()
                .any(|c| c.protocol() == Protocol::Postgres && c.users.iter().any(|u| &u.name == name));
            if !known {
                errors.push(ConfigError {
                    path: format!("admin.{key}[{i}]"),
                    reason: format!("{name:?} is not a user of any postgres cluster ([[clusters.users]])"),
                });
            }
        }
    }
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    listens.insert(config.admin.listen);
    for (i, c) in config.clusters.iter().enumerate() {
        if !names.insert(c.name.as_str()) {
            errors.push(ConfigError {
                path: format!("clusters[{i}].name"),
                reason: format!("duplicate cluster name {:?}", c.name),
            });
        }
        if !listens.insert(c.listen) {
            errors.push(ConfigError {
                path: format!("clusters[{i}].listen"),
                reason: format!("address {} is already used by another listener", c.listen),
            });
        }
        let mut users = HashSet::new();
        for (j, u) in c.users.iter().enumerate() {
            if !users.insert(u.name.as_str()) {
                errors.push(ConfigError {
                    path: format!("clusters[{i}].users[{j}].name"),
                    reason: format!("duplicate user {:?}", u.name),
                });
            }
        }
        // A user entry that failed to parse has been reported already.
        let users_path = format!("clusters[{i}].users");
        let bad_user = errors.iter().any(|e| e.path.starts_with(&users_path));
        if c.protocol() == Protocol::Postgres && c.users.is_empty() && !bad_user {
            errors.push(ConfigError {
                path: users_path,
                reason: "a postgres cluster needs at least one [[clusters.users]] entry".into(),
            });
        }
        let pg = c.postgres();
        if let Some(a) = pg.and_then(|p| p.auth_user.as_ref()) {
            if !c.users.iter().any(|u| &u.name == a) {
                errors.push(ConfigError {
                    path: format!("clusters[{i}].auth_user"),
                    reason: format!("{a:?} is not one of this cluster's users"),
                });
            }
        }
        if let Some(p) = pg.and_then(|p| p.probe_user.as_ref()) {
            if !c.users.iter().any(|u| &u.name == p) {
                errors.push(ConfigError {
                    path: format!("clusters[{i}].probe_user"),
                    reason: format!("{p:?} is not one of this cluster's users"),
                });
            }
        }
    }
}

/// "16MB" → 16 MiB. Units: B, kB, MB, GB, TB (powers of 1024, as PostgreSQL uses them).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A table being read: takes known keys out, records errors with their full path, and reports
/// whatever is left as unknown keys when finished.
pub(crate) struct Fields<'e> {
    table: Table,
    path: String,
    errors: &'e mut Vec<ConfigError>,
}

impl<'e> Fields<'e> {
    fn new(table: Table, path: String, errors: &'e mut Vec<ConfigError>) -> Self {
        Fields { table, path, errors }
    }

    /// A nested table sharing the same error list.
    fn child(&mut self, table: Table, path: String) -> Fields<'_> {
        Fields::new(table, path, self.errors)
    }

    fn key_path(&self, key: &str) -> String {
        match (self.path.is_empty(), key.is_empty()) {
            (_, true) => self.path.clone(),
            (true, false) => key.to_string(),
            (false, false) => format!("{}.{key}", self.path),
        }
    }

    fn error(&mut self, key: &str, reason: &str) {
        let path = self.key_path(key);
        self.errors.push(ConfigError {
            path,
            reason: reason.to_string(),
        });
    }

    fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    fn take_table(&mut self, key: &str) -> Option<Table> {
        match self.take(key)? {
            Value::Table(t) => Some(t),
            other => {
                self.error(key, &format!("must be a table, found {}", other.type_str()));
                None
            }
        }
    }

    fn take_array_of_tables(&mut self, key: &str) -> Vec<Table> {
        match self.take(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, v) in items.into_iter().enumerate() {
                    match v {
                        Value::Table(t) => out.push(t),
                        other => self.error(
                            &format!("{key}[{i}]"),
                            &format!("must be a table, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.error(
                    key,
                    &format!(
                        "must be an array of tables ([[{key}]]), found {}",
                        other.type_str()
                    ),
                );
                Vec::new()
            }
        }
    }

    fn string(&mut self, key: &str, default: Option<&str>) -> Option<String> {
        match self.take(key) {
            Some(Value::String(s)) if s.is_empty() => {
                self.error(key, "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.error(key, &format!("must be a string, found {}", other.type_str()));
                None
            }
            None => match default {
                Some(d) => Some(d.to_string()),
                None => {
                    self.error(key, "is required");
                    None
                }
            },
        }
    }

    fn optional_string(&mut self, key: &str) -> Option<String> {
        if self.has(key) {
            self.string(key, None)
        } else {
            None
        }
    }

    fn string_array(&mut self, key: &str) -> Option<Vec<String>> {
        match self.take(key) {
            None => Some(Vec::new()),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, v) in items.into_iter().enumerate() {
                    match v {
                        Value::String(s) => out.push(s),
                        other => {
                            self.error(
                                &format!("{key}[{i}]"),
                                &format!("must be a string, found {}", other.type_str()),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then_some(out)
            }
            Some(other) => {
                self.error(
                    key,
                    &format!("must be an array of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, key: &str, default: Option<T>, options: &[(&str, T)]) -> Option<T> {
        let s = match self.take(key) {
            Some(Value::String(s)) => s,
            Some(other) => {
                self.error(key, &format!("must be a string, found {}", other.type_str()));
                return None;
            }
            None => {
                if default.is_none() {
                    self.error(key, "is required");
                }
                return default;
            }
        };
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
            return Some(*v);
        }
        let expected = options
            .iter()
            .map(|(n, _)| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(" | ");
        self.error(key, &format!("unknown value {s:?}; expected {expected}"));
        None
    }

    /// A path to a file that must exist.
    fn optional_path(&mut self, key: &str) -> Option<std::path::PathBuf> {
        let s = self.optional_string(key)?;
        let p = std::path::PathBuf::from(&s);
        if !p.is_file() {
            self.error(key, &format!("{s:?} is not a readable file"));
        }
        Some(p)
    }

    fn boolean(&mut self, key: &str, default: bool) -> Option<bool> {
        match self.take(key) {
            None => Some(default),
            Some(Value::Boolean(b)) => Some(b),
            Some(other) => {
                self.error(key, &format!("must be true or false, found {}", other.type_str()));
                None
            }
        }
    }

    /// A byte size: an integer, or a string like "512kB", "16MB", "1GB" (powers of 1024).
    /// `Some(None)` when absent, `None` after an error.
    fn optional_bytes(&mut self, key: &str) -> Option<Option<u64>> {
        match self.take(key) {
            None => Some(None),
            Some(Value::Integer(n)) if n >= 0 => Some(Some(n as u64)),
            Some(Value::String(s)) => match parse_bytes(&s) {
                Some(n) => Some(Some(n)),
                None => {
                    self.error(
                        key,
                        &format!("invalid size {s:?}; use bytes or a string like \"16MB\""),
                    );
                    None
                }
            },
            Some(other) => {
                self.error(
                    key,
                    &format!("must be a size like \"16MB\", found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn integer(&mut self, key: &str, default: usize, min: usize, max: usize) -> Option<usize> {
        match self.take(key) {
            None => Some(default),
            Some(Value::Integer(n)) if n >= min as i64 && n <= max as i64 => Some(n as usize),
            Some(Value::Integer(n)) => {
                self.error(key, &format!("{n} is out of range {min}..={max}"));
                None
            }
            Some(other) => {
                self.error(key, &format!("must be an integer, found {}", other.type_str()));
                None
            }
        }
    }

    /// A duration that is off when absent: `Some(None)`; `None` after an error.
    fn optional_duration(&mut self, key: &str) -> Option<Option<Duration>> {
        if self.has(key) {
            self.duration(key, "").map(Some)
        } else {
            Some(None)
        }
    }

    fn duration(&mut self, key: &str, default: &str) -> Option<Duration> {
        let s = match self.take(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s,
            Some(other) => {
                self.error(
                    key,
                    &format!(
                        "must be a duration string like \"500ms\" or \"5s\", found {}",
                        other.type_str()
                    ),
                );
                return None;
            }
        };
        match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.error(key, "must be greater than zero");
                None
            }
            Err(e) => {
                self.error(key, &format!("invalid duration {s:?}: {e}"));
                None
            }
        }
    }

    fn socket_addr(&mut self, key: &str, default: &str) -> SocketAddr {
        match self.take(key) {
            None => default.parse().expect("valid default address"),
            Some(v) => self
                .parse_addr(key, v)
                .unwrap_or_else(|| default.parse().expect("valid default address")),
        }
    }

    fn socket_addr_required(&mut self, key: &str) -> Option<SocketAddr> {
        match self.take(key) {
            None => {
                self.error(key, "is required");
                None
            }
            Some(v) => self.parse_addr(key, v),
        }
    }

    fn parse_addr(&mut self, key: &str, v: Value) -> Option<SocketAddr> {
        match v {
            Value::String(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.error(key, &format!("{s:?} is not an \"ip:port\" address"));
                    None
                }
            },
            other => {
                self.error(
                    key,
                    &format!("must be an \"ip:port\" string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Reports every key nobody took as unknown.
    fn finish(self) {
        let mut keys: Vec<_> = self.table.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let path = if self.path.is_empty() {
                k.clone()
            } else {
                format!("{}.{k}", self.path)
            };
            self.errors.push(ConfigError {
                path,
                reason: "unknown key".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_PG: &str = r#"
[admin]
listen = "127.0.0.1:9930"

[[clusters]]
name = "app"
protocol = "postgres"
listen = "127.0.0.1:6432"
pool_mode = "transaction"
consistency = "eventual"
pool_size = 20

[clusters.discovery]
static = ["127.0.0.1:55432", "127.0.0.1:55433"]

[[clusters.users]]
name = "app"
password = "app-secret"
"#;

    #[test]
    fn auth_query_settings() {
        let with = |keys: &str| CONTRACT_PG.replace("pool_size = 20\n", &format!("pool_size = 20\n{keys}\n"));
        let c = Config::parse(&with("auth_user = \"app\"")).unwrap();
        assert_eq!(
            c.clusters[0].postgres().unwrap().auth_user.as_deref(),
            Some("app")
        );
        assert_eq!(c.clusters[0].postgres().unwrap().auth_query, DEFAULT_AUTH_QUERY);
        assert_eq!(c.clusters[0].postgres().unwrap().auth_dbname, None);
        assert_eq!(
            Config::parse(CONTRACT_PG).unwrap().clusters[0]
                .postgres()
                .unwrap()
                .auth_user,
            None
        );
        let errs = errors_of(&with("auth_user = \"ghost\"\nauth_query = \"SELECT 1\""));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].auth_user: \"ghost\" is not")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].auth_query: must name the role as $1")),
            "{errs:?}"
        );
        let errs = errors_of(&with("auth_dbname = \"postgres\""));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].auth_user: is required")),
            "{errs:?}"
        );
    }

    #[test]
    fn scram_verifiers_are_checked() {
        let verifier =
            sluice_postgres::scram::ScramSecret::new("app-secret", b"0123456789abcdef", 4096).verifier();
        let c = Config::parse(&CONTRACT_PG.replace("app-secret", &verifier)).unwrap();
        assert_eq!(c.clusters[0].users[0].password, verifier);
        let errs = errors_of(&CONTRACT_PG.replace("app-secret", "SCRAM-SHA-256$4096:nope"));
        assert!(
            errs.iter().any(
                |e| e.starts_with("clusters[0].users[0].password: is not a valid SCRAM-SHA-256 verifier")
            ),
            "{errs:?}"
        );
        // The error never quotes the secret.
        assert!(errs.iter().all(|e| !e.contains("nope")), "{errs:?}");
    }

    #[test]
    fn console_users_must_exist_and_timeouts_parse() {
        let with = |admin: &str| {
            CONTRACT_PG.replace(
                "[admin]\nlisten = \"127.0.0.1:9930\"\n",
                &format!("[admin]\nlisten = \"127.0.0.1:9930\"\n{admin}\n"),
            )
        };
        let c = Config::parse(&with("admin_users = [\"app\"]\npause_timeout = \"2s\"")).unwrap();
        assert_eq!(c.admin.admin_users, ["app"]);
        assert!(c.admin.stats_users.is_empty());
        assert_eq!(c.admin.pause_timeout, Duration::from_secs(2));
        assert_eq!(
            Config::parse(CONTRACT_PG).unwrap().admin.pause_timeout,
            DEFAULT_PAUSE_TIMEOUT
        );
        let errs = errors_of(&with(
            "stats_users = [\"app\", \"ghost\"]\nadmin_users = [3]\npause_timeout = \"soon\"",
        ));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("admin.stats_users[1]: \"ghost\" is not a user")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("admin.admin_users[0]:")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("admin.pause_timeout:")),
            "{errs:?}"
        );
    }

    #[test]
    fn contract_shape_parses_with_defaults() {
        let c = Config::parse(CONTRACT_PG).unwrap();
        let cl = &c.clusters[0];
        assert_eq!(cl.postgres().unwrap().pool_size, 20);
        assert_eq!(cl.postgres().unwrap().pool_mode, PoolMode::Transaction);
        assert_eq!(cl.probe_interval, Duration::from_secs(1));
        assert_eq!(cl.postgres().unwrap().failover_wait, Duration::from_secs(5));
        assert_eq!(
            cl.postgres().unwrap().write_hold,
            None,
            "off by default: fail fast as before"
        );
        assert_eq!(cl.postgres().unwrap().probe_database, "postgres");
        assert_eq!(
            cl.discovery,
            Discovery::Static(vec!["127.0.0.1:55432".into(), "127.0.0.1:55433".into()])
        );
        assert!(c.unsupported().is_empty());
    }

    #[test]
    fn runtime_threads() {
        assert_eq!(Config::parse(CONTRACT_PG).unwrap().runtime.threads, None);
        let one = format!("[runtime]\nthreads = 1\n{CONTRACT_PG}");
        assert_eq!(Config::parse(&one).unwrap().runtime.threads, Some(1));
        for (bad, why) in [
            ("threads = 0", "runtime.threads: 0 is out of range 1..=1024"),
            (
                "threads = \"2\"",
                "runtime.threads: must be an integer, found string",
            ),
            ("workers = 2", "runtime.workers"),
        ] {
            let text = format!("[runtime]\n{bad}\n{CONTRACT_PG}");
            let errors = errors_of(&text);
            assert!(errors.iter().any(|e| e.starts_with(why)), "{bad}: {errors:?}");
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.clusters[0].listen.port(), 6432);
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let text = CONTRACT_PG
            .replace(
                "pool_mode = \"transaction\"",
                "pool_mode = \"statement\"\nbogus = 1",
            )
            .replace("pool_size = 20", "pool_size = 0\ncheckout_timeout = \"soon\"")
            .replace("listen = \"127.0.0.1:9930\"", "listen = \"nowhere\"");
        let errs = Config::parse(&text).unwrap_err().0;
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "admin.listen",
            "clusters[0].pool_mode",
            "clusters[0].bogus",
            "clusters[0].pool_size",
            "clusters[0].checkout_timeout",
        ] {
            assert!(paths.contains(&p), "missing {p} in {errs:?}");
        }
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn missing_and_duplicate_things_are_errors() {
        let errs = Config::parse("[[clusters]]\nname = \"a\"\n").unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.contains(&"clusters[0].protocol: is required".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"clusters[0].listen: is required".to_string()),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("clusters[0].discovery:")),
            "{text:?}"
        );
        let twice = format!(
            "{CONTRACT_PG}\n{}",
            &CONTRACT_PG[CONTRACT_PG.find("[[clusters]]").unwrap()..]
        );
        let errs = Config::parse(&twice).unwrap_err().0;
        assert!(errs.iter().any(|e| e.path == "clusters[1].name"), "{errs:?}");
        assert!(errs.iter().any(|e| e.path == "clusters[1].listen"), "{errs:?}");
    }

    #[test]
    fn consistency_topology_and_lag() {
        let text = CONTRACT_PG.replace(
            "\"eventual\"",
            "\"read-your-writes\"\nmax_replica_lag = \"16MB\"\ntopology = \"multi-active\"\nzone = \"a\"",
        );
        let c = &Config::parse(&text).unwrap().clusters[0];
        assert_eq!(c.postgres().unwrap().consistency, Consistency::ReadYourWrites);
        assert_eq!(c.postgres().unwrap().max_replica_lag, Some(16 << 20));
        assert_eq!(c.postgres().unwrap().topology, TopologyKind::MultiActive);
        assert_eq!(c.zone.as_deref(), Some("a"));
        assert_eq!(parse_bytes("512kB"), Some(512 << 10));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("1 parsec"), None);
        let bad = CONTRACT_PG.replace("pool_size = 20", "pool_size = 20\nmax_replica_lag = \"lots\"");
        let errs = Config::parse(&bad).unwrap_err().0;
        assert_eq!(errs[0].path, "clusters[0].max_replica_lag", "{errs:?}");
    }

    #[test]
    fn kubernetes_and_cql_run() {
        let k8s = r#"
[[clusters]]
name = "pg"
protocol = "postgres"
listen = "127.0.0.1:6433"
[clusters.discovery.kubernetes]
namespace = "db"
service = "pg-r"
port = "postgres"
roles = { label = "role", primary = "master", replica = "replica" }
[[clusters.users]]
name = "app"
password = "x"
"#;
        let c = Config::parse(k8s).unwrap();
        assert!(c.unsupported().is_empty(), "Kubernetes discovery is supported");
        let cql = r#"
[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:19042"
[clusters.discovery]
static = ["127.0.0.1:9042"]
"#;
        let c = Config::parse(cql).unwrap();
        assert!(c.unsupported().is_empty(), "CQL with static seeds is supported");
    }

    #[test]
    fn postgres_keys_on_a_cql_cluster_are_named_errors() {
        let cql = r#"
[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:19042"
pool_mode = "session"
consistency = "read-your-writes"
max_replica_lag = "1MB"
pool_size = 5
write_hold = "10s"
[clusters.discovery]
static = ["127.0.0.1:9042"]
"#;
        let errs = Config::parse(cql).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        for key in [
            "pool_mode",
            "consistency",
            "max_replica_lag",
            "pool_size",
            "write_hold",
        ] {
            let path = format!("clusters[0].{key}");
            let e = errs
                .0
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("{path} in {paths:?}"));
            assert_eq!(e.reason, "applies to postgres clusters only");
        }
    }

    #[test]
    fn auth_query_keys_on_a_cql_cluster_are_named_errors() {
        let cql = r#"
[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:19042"
auth_user = "lookup"
auth_query = "SELECT 1"
auth_dbname = "postgres"
[clusters.discovery]
static = ["127.0.0.1:9042"]
"#;
        let errs = Config::parse(cql).unwrap_err();
        for key in ["auth_user", "auth_query", "auth_dbname"] {
            let path = format!("clusters[0].{key}");
            assert!(
                errs.0
                    .iter()
                    .any(|e| e.path == path && e.reason == "applies to postgres clusters only"),
                "{path}: {errs:?}"
            );
        }
    }

    #[test]
    fn write_hold_is_a_duration() {
        let on = CONTRACT_PG.replace(
            "[clusters.discovery]",
            "write_hold = \"10s\"\n[clusters.discovery]",
        );
        assert_eq!(
            Config::parse(&on).unwrap().clusters[0]
                .postgres()
                .unwrap()
                .write_hold,
            Some(Duration::from_secs(10))
        );
        let bad = CONTRACT_PG.replace(
            "[clusters.discovery]",
            "write_hold = \"soon\"\n[clusters.discovery]",
        );
        let errs = errors_of(&bad);
        assert!(
            errs.iter().any(|e| e.starts_with("clusters[0].write_hold:")),
            "{errs:?}"
        );
    }

    #[test]
    fn debug_output_hides_passwords() {
        let c = Config::parse(CONTRACT_PG).unwrap();
        assert!(!format!("{c:?}").contains("app-secret"));
    }

    #[test]
    fn admin_listens_on_localhost_by_default() {
        let without = CONTRACT_PG.replace("[admin]\nlisten = \"127.0.0.1:9930\"\n", "");
        let bare = CONTRACT_PG.replace("listen = \"127.0.0.1:9930\"\n", "");
        for text in [without, bare, EMBEDDED_DEFAULT.to_string()] {
            let c = Config::parse(&text).unwrap();
            assert!(c.admin.listen.ip().is_loopback(), "{}", c.admin.listen);
        }
    }

    fn with_password(line: &str) -> String {
        CONTRACT_PG.replace("password = \"app-secret\"", line)
    }

    /// Every error message of a configuration that must not parse.
    pub(super) fn errors_of(text: &str) -> Vec<String> {
        Config::parse(text)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn password_from_environment() {
        std::env::set_var("SLUICE_TEST_PW_ENV_SET", "from-env");
        std::env::set_var("SLUICE_TEST_PW_ENV_EMPTY", "");
        let c = Config::parse(&with_password("password_env = \"SLUICE_TEST_PW_ENV_SET\"")).unwrap();
        assert_eq!(c.clusters[0].users[0].password, "from-env");
        let errs = errors_of(&with_password("password_env = \"SLUICE_TEST_PW_ENV_UNSET\""));
        assert_eq!(
            errs,
            ["clusters[0].users[0].password_env: environment variable \"SLUICE_TEST_PW_ENV_UNSET\" is not set"]
        );
        let errs = errors_of(&with_password("password_env = \"SLUICE_TEST_PW_ENV_EMPTY\""));
        assert_eq!(
            errs,
            ["clusters[0].users[0].password_env: environment variable \"SLUICE_TEST_PW_ENV_EMPTY\" is empty"]
        );
    }

    #[test]
    fn password_from_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("plain", "s3cret", "s3cret"),
            ("newline", "s3cret\n", "s3cret"),
            ("crlf", "s3cret\r\n", "s3cret"),
            ("two", "s3cret\n\n", "s3cret\n"),
            ("spaces", " s3cret \n", " s3cret "),
        ];
        for (name, content, want) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let line = format!("password_file = {:?}", path.display().to_string());
            let c = Config::parse(&with_password(&line)).unwrap();
            assert_eq!(c.clusters[0].users[0].password, want, "{name}");
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let errs = errors_of(&with_password(&format!(
            "password_file = {:?}",
            empty.display().to_string()
        )));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("clusters[0].users[0].password_file: ") && errs[0].ends_with("is empty"));
        let errs = errors_of(&with_password("password_file = \"/dev/zero\""));
        assert_eq!(
            errs,
            ["clusters[0].users[0].password_file: cannot read \"/dev/zero\": not a regular file"]
        );
        let missing = dir.path().join("missing");
        let errs = errors_of(&with_password(&format!(
            "password_file = {:?}",
            missing.display().to_string()
        )));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("clusters[0].users[0].password_file: cannot read"),
            "{errs:?}"
        );
    }

    #[test]
    fn exactly_one_password_source() {
        let errs = errors_of(&with_password(""));
        assert_eq!(
            errs,
            ["clusters[0].users[0].password: is required (or password_env, or password_file)"]
        );
        let errs = errors_of(&with_password("password = \"a\"\npassword_env = \"HOME\""));
        assert_eq!(
            errs,
            ["clusters[0].users[0]: set exactly one of password, password_env, password_file (found password, password_env)"]
        );
        let errs = errors_of(&with_password("password_env = 7"));
        assert_eq!(
            errs,
            ["clusters[0].users[0].password_env: must be a string, found integer"]
        );
        // A secret read from the environment never shows in errors or Debug output.
        std::env::set_var("SLUICE_TEST_PW_ENV_SECRET", "hunter2-from-env");
        let c = Config::parse(&with_password("password_env = \"SLUICE_TEST_PW_ENV_SECRET\"")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
