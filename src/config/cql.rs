//! `[clusters.cql]`: the settings only CQL clusters have. Every key is optional, so the
//! contract file (no such table) runs on the defaults.

use std::time::Duration;

use super::{Fields, Protocol};

/// Backend connections per node and (protocol version, keyspace, user) by default.
pub const DEFAULT_CONNECTIONS_PER_NODE: usize = 2;

/// `[clusters.cql]`.
#[derive(Clone, PartialEq)]
pub struct CqlConfig {
    /// The data center whose replicas are preferred; by default the cluster's `zone`, else the
    /// data center of the first node sluice reaches.
    pub local_datacenter: Option<String>,
    /// Multiplexed backend connections per node, (protocol version, keyspace, user) and core
    /// (runtime thread): a request's answers are read on its client's thread.
    pub connections_per_node: usize,
    /// Credentials sluice logs in with towards the cluster (PasswordAuthenticator). Without
    /// them, clients' own credentials pass through.
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long a forwarded request may wait for its node's answer.
    pub request_timeout: Duration,
    /// Requests one client connection may have in flight before sluice stops reading from it.
    pub max_requests_per_client: usize,
    /// A node connection that has received nothing for this long gets a heartbeat (OPTIONS).
    pub heartbeat_interval: Duration,
    /// A heartbeat unanswered for this long marks its node down.
    pub heartbeat_timeout: Duration,
    /// This many requests in a row timing out on a node mark it down (0: never).
    pub max_consecutive_timeouts: usize,
}

impl Default for CqlConfig {
    fn default() -> Self {
        CqlConfig {
            local_datacenter: None,
            connections_per_node: DEFAULT_CONNECTIONS_PER_NODE,
            username: None,
            password: None,
            request_timeout: Duration::from_secs(12),
            max_requests_per_client: 2048,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(2),
            max_consecutive_timeouts: 3,
        }
    }
}

impl std::fmt::Debug for CqlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlConfig")
            .field("local_datacenter", &self.local_datacenter)
            .field("connections_per_node", &self.connections_per_node)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("max_requests_per_client", &self.max_requests_per_client)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("max_consecutive_timeouts", &self.max_consecutive_timeouts)
            .finish()
    }
}

/// Takes the `cql` table out of a `[[clusters]]` entry. `None` means an error was recorded.
pub(super) fn parse_cql(f: &mut Fields<'_>, protocol: Option<Protocol>) -> Option<CqlConfig> {
    let Some(t) = f.take_table("cql") else {
        return Some(CqlConfig::default());
    };
    if protocol == Some(Protocol::Postgres) {
        f.error(
            "cql",
            "only clusters with protocol = \"cql\" take a [clusters.cql] table",
        );
        return None;
    }
    let path = f.key_path("cql");
    let mut c = f.child(t, path);
    let d = CqlConfig::default();
    let local_datacenter = c.optional_string("local_datacenter");
    let connections_per_node = c.integer("connections_per_node", d.connections_per_node, 1, 64);
    let username = c.optional_string("username");
    let password = c.optional_string("password");
    let request_timeout = c.duration("request_timeout", "12s");
    let max_requests_per_client = c.integer("max_requests_per_client", d.max_requests_per_client, 1, 32_768);
    let heartbeat_interval = c.duration("heartbeat_interval", "1s");
    let heartbeat_timeout = c.duration("heartbeat_timeout", "2s");
    let max_consecutive_timeouts = c.integer("max_consecutive_timeouts", d.max_consecutive_timeouts, 0, 1000);
    if username.is_some() != password.is_some() {
        c.error("", "set both `username` and `password`, or neither");
    }
    let ok = username.is_some() == password.is_some();
    c.finish();
    let out = CqlConfig {
        local_datacenter,
        connections_per_node: connections_per_node?,
        username,
        password,
        request_timeout: request_timeout?,
        max_requests_per_client: max_requests_per_client?,
        heartbeat_interval: heartbeat_interval?,
        heartbeat_timeout: heartbeat_timeout?,
        max_consecutive_timeouts: max_consecutive_timeouts?,
    };
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    const CONTRACT_CQL: &str = r#"
[admin]
listen = "127.0.0.1:9931"

[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:19042"

[clusters.discovery]
static = ["127.0.0.1:9042", "127.0.0.2:9042", "127.0.0.3:9042"]
"#;

    #[test]
    fn contract_runs_on_defaults() {
        let c = Config::parse(CONTRACT_CQL).unwrap();
        assert_eq!(c.clusters[0].cql().unwrap().connections_per_node, 2);
        assert!(c.unsupported().is_empty(), "{:?}", c.unsupported());
    }

    #[test]
    fn tls_keys_apply_to_cql_clusters_with_cql_semantics() {
        use super::super::BackendTlsMode;
        // Plain TCP to nodes unless asked: CQL has nothing to "prefer".
        let c = Config::parse(CONTRACT_CQL).unwrap();
        assert_eq!(c.clusters[0].backend_tls, BackendTlsMode::Disable);
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let with = |keys: &str| {
            CONTRACT_CQL.replace("[clusters.discovery]", &format!("{keys}\n[clusters.discovery]"))
        };
        let errs = |keys: &str| -> Vec<String> {
            Config::parse(&with(keys))
                .unwrap_err()
                .0
                .iter()
                .map(|e| format!("{}: {}", e.path, e.reason))
                .collect()
        };
        let e = errs("backend_tls = \"prefer\"");
        assert!(
            e.iter()
                .any(|e| e.starts_with("clusters[0].backend_tls: \"prefer\" needs a TLS negotiation")),
            "{e:?}"
        );
        assert_eq!(
            errs("backend_tls = \"verify-full\""),
            ["clusters[0].backend_tls: \"verify-full\" needs backend_tls_ca"]
        );
        assert_eq!(
            errs("require_tls = true"),
            ["clusters[0].require_tls: needs tls_cert and tls_key"]
        );
        assert_eq!(
            errs(&format!("tls_client_ca = \"{file}\"")),
            ["clusters[0].tls_client_ca: needs tls_cert and tls_key"]
        );
        let e = errs("tls_client_ca = \"/nonexistent/ca.pem\"");
        assert!(e.iter().any(|e| e.contains("is not a readable file")), "{e:?}");
        let c = Config::parse(&with("backend_tls = \"require\"")).unwrap();
        assert_eq!(c.clusters[0].backend_tls, BackendTlsMode::Require);
        // A PostgreSQL listener verifies client certificates too, and needs its own identity.
        let pg = format!(
            "[[clusters]]\nname = \"pg\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:6432\"\ntls_client_ca = \"{file}\"\n[clusters.discovery]\nstatic = [\"127.0.0.1:5432\"]\n[[clusters.users]]\nname = \"app\"\npassword = \"x\"\n"
        );
        let e: Vec<String> = Config::parse(&pg)
            .unwrap_err()
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.reason))
            .collect();
        assert_eq!(e, ["clusters[0].tls_client_ca: needs tls_cert and tls_key"]);
        let pg_default = pg.replace(&format!("tls_client_ca = \"{file}\"\n"), "");
        assert_eq!(
            Config::parse(&pg_default).unwrap().clusters[0].backend_tls,
            BackendTlsMode::Prefer
        );
    }

    #[test]
    fn keys_are_validated() {
        let text = format!(
            "{CONTRACT_CQL}\n[clusters.cql]\nlocal_datacenter = \"dc1\"\nconnections_per_node = 0\nusername = \"u\"\nbogus = 1\n"
        );
        let errs = Config::parse(&text).unwrap_err().0;
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"clusters[0].cql.connections_per_node"),
            "{errs:?}"
        );
        assert!(paths.contains(&"clusters[0].cql.bogus"), "{errs:?}");
        assert!(paths.contains(&"clusters[0].cql"), "{errs:?}");
        let ok = format!("{CONTRACT_CQL}\n[clusters.cql]\nlocal_datacenter = \"dc1\"\nusername = \"u\"\npassword = \"p\"\n");
        let c = Config::parse(&ok).unwrap();
        assert_eq!(
            c.clusters[0].cql().unwrap().local_datacenter.as_deref(),
            Some("dc1")
        );
        assert_eq!(
            c.clusters[0].cql().unwrap().heartbeat_timeout,
            std::time::Duration::from_secs(2)
        );
        let health = format!("{CONTRACT_CQL}\n[clusters.cql]\nheartbeat_interval = \"250ms\"\nheartbeat_timeout = \"0s\"\nmax_consecutive_timeouts = 0\n");
        let errs = Config::parse(&health).unwrap_err().0;
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["clusters[0].cql.heartbeat_timeout"], "{errs:?}");
        assert!(!format!("{c:?}").contains("\"p\""));
    }
}
