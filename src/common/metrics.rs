//! Prometheus metrics (`prometheus-client`), all under the `sluice_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::common::striped::Striped;

/// `sluice_queries_total`'s counter type.
pub type QueryCounter = Counter<u64, Striped>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub cluster: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabels {
    pub cluster: String,
    pub node: String,
    /// `idle` or `active` (connections); `up` or `down` (health changes).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub cluster: String,
    /// `primary` or `replica`: what the request asked for.
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub cluster: String,
    pub node: String,
    /// `ok` or `error` (PostgreSQL probes also `slow`: late, while the node answers its
    /// clients).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub cluster: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryLabels {
    pub cluster: String,
    /// `static`, `kubernetes` or `dns`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CqlRequestLabels {
    pub cluster: String,
    /// The request's opcode in lower case: `query`, `execute`, `batch`, `prepare`.
    pub opcode: &'static str,
    /// `token` (to a replica of the request's partition), `any` (no partition to route by),
    /// `lwt` (the first replica in ring order), or `local` (answered by sluice itself).
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpcodeLabels {
    pub cluster: String,
    pub opcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoordinatorLabels {
    pub cluster: String,
    /// `replica` or `other`: whether the node sent a request with a token is a replica of it.
    pub coordinator: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub cluster: String,
    /// The CQL error name in lower case (`unavailable`, `read_timeout`, `invalid`, ...).
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterResultLabels {
    pub cluster: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub cluster: String,
    /// `connected`, `lost`, `topology_change`, `status_change`, `schema_change`.
    pub event: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn wait_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
}

fn request_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every metric sluice exports.
pub struct Metrics {
    registry: Registry,
    /// Connected clients.
    pub clients: Family<ClusterLabels, Gauge>,
    /// Backend connections by node and state.
    pub backend_connections: Family<NodeStateLabels, Gauge>,
    /// Routed requests (a transaction or a standalone statement batch) by route.
    /// Bumped by every transaction, on every runtime thread: striped (see `common::striped`).
    pub queries: Family<RouteLabels, QueryCounter>,
    /// Time spent waiting for a backend connection.
    pub checkout_wait: HistogramFamily<ClusterLabels>,
    /// Probe results by node.
    pub probes: Family<ResultLabels, Counter>,
    /// 1 while the probe says the node is primary.
    pub node_primary: Family<NodeLabels, Gauge>,
    /// 1 while the node is up (it answers its probe; CQL: nothing found it down).
    pub node_healthy: Family<NodeLabels, Gauge>,
    /// Changes of a node between up and down, by the state it changed to.
    pub node_health_changes: Family<NodeStateLabels, Counter>,
    /// Requests that failed inside sluice, by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// Client logins refused, by reason.
    pub auth_failures: Family<ClusterLabels, Counter>,
    /// Clients pinned to their backend by session state, by reason.
    pub pins: Family<ReasonLabels, Counter>,
    /// Session-settings replays sent before a client's request.
    pub settings_replays: Family<ClusterLabels, Counter>,
    /// 1 while the node's role label disagrees with what the node itself reports.
    pub role_disagreement: Family<NodeLabels, Gauge>,
    /// Times a node's role label started disagreeing with its probed role.
    pub role_disagreements: Family<NodeLabels, Counter>,
    /// 1 while the discovery source answers (0 during an API server or DNS outage, when the
    /// last known members keep serving).
    pub discovery_up: Family<DiscoveryLabels, Gauge>,
    /// Failed discovery requests (watch errors, lookups).
    pub discovery_errors: Family<DiscoveryLabels, Counter>,
    /// Distinct member lists published by discovery.
    pub discovery_updates: Family<DiscoveryLabels, Counter>,
    /// Members in the last published list.
    pub discovery_members: Family<DiscoveryLabels, Gauge>,
    /// Configuration reloads by result.
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// CQL requests by opcode and route.
    pub cql_requests: Family<CqlRequestLabels, Counter>,
    /// CQL requests with a token, by whether their coordinator is a replica of it.
    pub cql_coordinators: Family<CoordinatorLabels, Counter>,
    /// Time from a CQL request read to its answer queued for the client.
    pub cql_request_duration: HistogramFamily<OpcodeLabels>,
    /// CQL ERROR answers sent to clients (from nodes or from sluice), by error code.
    pub cql_errors: Family<CodeLabels, Counter>,
    /// Open multiplexed connections to each CQL node.
    pub cql_node_connections: Family<NodeLabels, Gauge>,
    /// Requests in flight on each CQL node.
    pub cql_node_inflight: Family<NodeLabels, Gauge>,
    /// Control connection events: sessions started and lost, and events from the cluster.
    pub cql_control_events: Family<EventLabels, Counter>,
    /// Statements prepared again on a node that answered UNPREPARED, by result.
    pub cql_reprepares: Family<ClusterResultLabels, Counter>,
    /// 1 while a `write_hold` cluster has no confirmed writable primary (writes are held).
    pub write_hold_active: Family<ClusterLabels, Gauge>,
    /// Write holds started (a confirmed writable primary lost).
    pub write_holds: Family<ClusterLabels, Counter>,
    /// Requests that waited in a write hold.
    pub write_hold_requests: Family<ClusterLabels, Counter>,
    /// How long each held request waited.
    pub write_hold_wait: HistogramFamily<ClusterLabels>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let m = Metrics {
            clients: Family::default(),
            backend_connections: Family::default(),
            queries: Family::default(),
            checkout_wait: Family::new_with_constructor(wait_histogram),
            probes: Family::default(),
            node_primary: Family::default(),
            node_healthy: Family::default(),
            node_health_changes: Family::default(),
            errors: Family::default(),
            auth_failures: Family::default(),
            pins: Family::default(),
            settings_replays: Family::default(),
            role_disagreement: Family::default(),
            role_disagreements: Family::default(),
            discovery_up: Family::default(),
            discovery_errors: Family::default(),
            discovery_updates: Family::default(),
            discovery_members: Family::default(),
            config_reloads: Family::default(),
            cql_requests: Family::default(),
            cql_coordinators: Family::default(),
            cql_request_duration: Family::new_with_constructor(request_histogram),
            cql_errors: Family::default(),
            cql_node_connections: Family::default(),
            cql_node_inflight: Family::default(),
            cql_control_events: Family::default(),
            cql_reprepares: Family::default(),
            write_hold_active: Family::default(),
            write_holds: Family::default(),
            write_hold_requests: Family::default(),
            write_hold_wait: Family::new_with_constructor(wait_histogram),
            registry: Registry::default(),
        };
        registry.register("clients", "Connected clients", m.clients.clone());
        registry.register(
            "backend_connections",
            "Backend connections by node and state (idle, active)",
            m.backend_connections.clone(),
        );
        registry.register(
            "queries",
            "Routed requests (transactions or statement batches) by route",
            m.queries.clone(),
        );
        registry.register(
            "checkout_wait_seconds",
            "Time waiting for a backend connection from the pool",
            m.checkout_wait.clone(),
        );
        registry.register("probes", "Role probes by node and result", m.probes.clone());
        registry.register(
            "node_primary",
            "1 while the node reports pg_is_in_recovery() = false",
            m.node_primary.clone(),
        );
        registry.register(
            "node_healthy",
            "1 while the node is up (it answers its probe; CQL: nothing found it down)",
            m.node_healthy.clone(),
        );
        registry.register(
            "node_health_changes",
            "Changes of a node between up and down, by the state it changed to",
            m.node_health_changes.clone(),
        );
        registry.register("errors", "Requests failed by sluice, by reason", m.errors.clone());
        registry.register("auth_failures", "Client logins refused", m.auth_failures.clone());
        registry.register(
            "pinned_clients",
            "Clients pinned to one backend connection by session state (transaction mode), by reason",
            m.pins.clone(),
        );
        registry.register(
            "settings_replays",
            "Session settings replayed on a backend before a client's request",
            m.settings_replays.clone(),
        );
        registry.register(
            "node_role_disagreement",
            "1 while the node's role label disagrees with its probed role",
            m.role_disagreement.clone(),
        );
        registry.register(
            "role_disagreements",
            "Times a node's role label started disagreeing with its probed role",
            m.role_disagreements.clone(),
        );
        registry.register(
            "discovery_up",
            "1 while the discovery source answers; 0 while the last known members keep serving",
            m.discovery_up.clone(),
        );
        registry.register(
            "discovery_errors",
            "Failed discovery requests (watch errors, DNS lookups)",
            m.discovery_errors.clone(),
        );
        registry.register(
            "discovery_updates",
            "Distinct member lists published by discovery",
            m.discovery_updates.clone(),
        );
        registry.register(
            "discovery_members",
            "Members in the last list published by discovery",
            m.discovery_members.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "cql_requests",
            "CQL requests by opcode and route (token, any, lwt, local)",
            m.cql_requests.clone(),
        );
        registry.register(
            "cql_coordinators",
            "CQL requests with a token by coordinator: a replica of the token, or another node",
            m.cql_coordinators.clone(),
        );
        registry.register(
            "cql_request_duration_seconds",
            "CQL request latency through sluice, from the request read to its answer queued",
            m.cql_request_duration.clone(),
        );
        registry.register(
            "cql_errors",
            "CQL ERROR answers sent to clients, by error code",
            m.cql_errors.clone(),
        );
        registry.register(
            "cql_node_connections",
            "Open multiplexed connections to each CQL node",
            m.cql_node_connections.clone(),
        );
        registry.register(
            "cql_node_inflight",
            "CQL requests in flight on each node",
            m.cql_node_inflight.clone(),
        );
        registry.register(
            "cql_control_events",
            "CQL control connection events (connected, lost), cluster events it received, and nodes marked down or up (node_down, node_up)",
            m.cql_control_events.clone(),
        );
        registry.register(
            "cql_reprepares",
            "Statements prepared again on a node that answered UNPREPARED, by result (ok, error)",
            m.cql_reprepares.clone(),
        );
        registry.register(
            "write_hold_active",
            "1 while writes are held: no confirmed writable primary (write_hold clusters)",
            m.write_hold_active.clone(),
        );
        registry.register(
            "write_holds",
            "Write holds started (write_hold clusters)",
            m.write_holds.clone(),
        );
        registry.register(
            "write_hold_requests",
            "Requests that waited in a write hold",
            m.write_hold_requests.clone(),
        );
        registry.register(
            "write_hold_wait_seconds",
            "Time each held request waited for a confirmed writable primary",
            m.write_hold_wait.clone(),
        );
        for result in ["ok", "error"] {
            m.config_reloads.get_or_create_owned(&ReloadLabels { result });
        }
        Metrics { registry, ..m }
    }

    /// Creates the series of `cluster` whose labels are all known in advance at 0, so that
    /// they are in `/metrics` (and dashboards can `rate()` them) before the first event.
    pub fn init_cluster(&self, cluster: &str) {
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        self.auth_failures.get_or_create_owned(&labels);
        self.settings_replays.get_or_create_owned(&labels);
    }

    /// Creates the series of CQL cluster `cluster` whose labels are known in advance at 0.
    pub fn init_cql_cluster(&self, cluster: &str) {
        self.init_cluster(cluster);
        let c = || cluster.to_string();
        for (opcode, routes) in CQL_ROUTES {
            for route in *routes {
                self.cql_requests.get_or_create_owned(&CqlRequestLabels {
                    cluster: c(),
                    opcode,
                    route,
                });
            }
            self.cql_request_duration
                .get_or_create_owned(&OpcodeLabels { cluster: c(), opcode });
        }
        for reason in CQL_ERROR_REASONS {
            self.errors
                .get_or_create_owned(&ReasonLabels { cluster: c(), reason });
        }
        for coordinator in ["replica", "other"] {
            self.cql_coordinators.get_or_create_owned(&CoordinatorLabels {
                cluster: c(),
                coordinator,
            });
        }
        for code in CQL_ERROR_NAMES.iter().map(|(_, name)| *name) {
            self.cql_errors
                .get_or_create_owned(&CodeLabels { cluster: c(), code });
        }
        for event in CQL_CONTROL_EVENTS {
            self.cql_control_events
                .get_or_create_owned(&EventLabels { cluster: c(), event });
        }
        for result in ["ok", "error"] {
            self.cql_reprepares
                .get_or_create_owned(&ClusterResultLabels { cluster: c(), result });
        }
    }

    /// Creates the write-hold series of a `write_hold` cluster at 0.
    pub fn init_write_hold(&self, cluster: &str) {
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        self.write_hold_active.get_or_create_owned(&labels);
        self.write_holds.get_or_create_owned(&labels);
        self.write_hold_requests.get_or_create_owned(&labels);
        self.write_hold_wait.get_or_create_owned(&labels);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Counts one failure of `reason` in `cluster`.
    pub fn error(&self, cluster: &str, reason: &'static str) {
        self.errors
            .get_or_create(&ReasonLabels {
                cluster: cluster.to_string(),
                reason,
            })
            .inc();
    }
}

/// The CQL opcodes sluice counts requests of, with the routes each can take.
pub const CQL_ROUTES: &[(&str, &[&str])] = &[
    ("query", &["token", "any", "lwt", "local"]),
    ("execute", &["token", "any", "lwt", "local"]),
    ("batch", &["token", "any", "lwt"]),
    ("prepare", &["any", "local"]),
];

/// Why sluice itself failed a CQL request or connection (`sluice_errors_total{reason}`).
pub const CQL_ERROR_REASONS: [&str; 8] = [
    "too_many_clients",
    "no_node",
    "timeout",
    "backend_refused",
    "backend_lost",
    "backend_auth",
    "tls_required",
    "tls_handshake",
];

/// Control connection events (`sluice_cql_control_events_total{event}`).
pub const CQL_CONTROL_EVENTS: [&str; 7] = [
    "connected",
    "lost",
    "topology_change",
    "status_change",
    "schema_change",
    "node_down",
    "node_up",
];

/// CQL error codes and their label values (`sluice_cql_errors_total{code}`).
pub const CQL_ERROR_NAMES: &[(i32, &str)] = &[
    (0x0000, "server_error"),
    (0x000A, "protocol_error"),
    (0x0100, "auth_error"),
    (0x1000, "unavailable"),
    (0x1001, "overloaded"),
    (0x1002, "is_bootstrapping"),
    (0x1003, "truncate_error"),
    (0x1100, "write_timeout"),
    (0x1200, "read_timeout"),
    (0x1300, "read_failure"),
    (0x1400, "function_failure"),
    (0x1500, "write_failure"),
    (0x1600, "cdc_write_failure"),
    (0x1700, "cas_write_unknown"),
    (0x2000, "syntax_error"),
    (0x2100, "unauthorized"),
    (0x2200, "invalid"),
    (0x2300, "config_error"),
    (0x2400, "already_exists"),
    (0x2500, "unprepared"),
];

/// The label value of a CQL error code (`other` for codes the protocol does not define).
pub fn cql_error_name(code: i32) -> &'static str {
    CQL_ERROR_NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("other", |(_, n)| n)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
