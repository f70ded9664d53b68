//! Prometheus metrics (`prometheus-client`), all under the `sluice_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    /// `idle` or `active`.
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
    /// `ok` or `error`.
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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn wait_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
}

/// Every metric sluice exports.
pub struct Metrics {
    registry: Registry,
    /// Connected clients.
    pub clients: Family<ClusterLabels, Gauge>,
    /// Backend connections by node and state.
    pub backend_connections: Family<NodeStateLabels, Gauge>,
    /// Routed requests (a transaction or a standalone statement batch) by route.
    pub queries: Family<RouteLabels, Counter>,
    /// Time spent waiting for a backend connection.
    pub checkout_wait: HistogramFamily<ClusterLabels>,
    /// Probe results by node.
    pub probes: Family<ResultLabels, Counter>,
    /// 1 while the probe says the node is primary.
    pub node_primary: Family<NodeLabels, Gauge>,
    /// 1 while the node answers its probe.
    pub node_healthy: Family<NodeLabels, Gauge>,
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
            "1 while the node answers its probe",
            m.node_healthy.clone(),
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
