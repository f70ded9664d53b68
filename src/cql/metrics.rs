//! The Prometheus series of one CQL cluster, resolved once so that the request path counts
//! without building label sets (see `src/metrics.rs` for the families).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use sluice_cql::codec::Envelope;
use sluice_cql::frame::Opcode;

use crate::common::metrics::{
    ClusterResultLabels, CodeLabels, CoordinatorLabels, CqlRequestLabels, EventLabels, Metrics, NodeLabels,
    OpcodeLabels, CQL_ROUTES,
};

/// Where a request went, for `sluice_cql_requests_total{route}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// To a replica of its partition's token.
    Token,
    /// No partition to route by: any node.
    Any,
    /// A lightweight transaction: the first replica in ring order.
    Lwt,
    /// Answered by sluice itself (system.local/peers, USE).
    Local,
}

impl RouteKind {
    fn label(self) -> &'static str {
        match self {
            RouteKind::Token => "token",
            RouteKind::Any => "any",
            RouteKind::Lwt => "lwt",
            RouteKind::Local => "local",
        }
    }
}

/// The opcodes counted, in the order of [`CQL_ROUTES`].
fn opcode_index(op: Opcode) -> Option<usize> {
    match op {
        Opcode::Query => Some(0),
        Opcode::Execute => Some(1),
        Opcode::Batch => Some(2),
        Opcode::Prepare => Some(3),
        _ => None,
    }
}

/// One CQL cluster's series.
pub struct CqlMetrics {
    metrics: Arc<Metrics>,
    cluster: String,
    /// Per opcode (see [`opcode_index`]): (route label, counter) pairs and the latency.
    requests: Vec<(Vec<(&'static str, Counter)>, Histogram)>,
    /// `replica`, `other`.
    coordinators: [Counter; 2],
}

impl CqlMetrics {
    /// Resolves the series of `cluster`, creating those known in advance at 0.
    pub fn new(metrics: Arc<Metrics>, cluster: &str) -> CqlMetrics {
        metrics.init_cql_cluster(cluster);
        let requests = CQL_ROUTES
            .iter()
            .map(|(opcode, routes)| {
                let counters = routes
                    .iter()
                    .map(|route| {
                        let c = metrics.cql_requests.get_or_create_owned(&CqlRequestLabels {
                            cluster: cluster.to_string(),
                            opcode,
                            route,
                        });
                        (*route, c)
                    })
                    .collect();
                let h = metrics.cql_request_duration.get_or_create_owned(&OpcodeLabels {
                    cluster: cluster.to_string(),
                    opcode,
                });
                (counters, h)
            })
            .collect();
        let coordinators = ["replica", "other"].map(|coordinator| {
            metrics.cql_coordinators.get_or_create_owned(&CoordinatorLabels {
                cluster: cluster.to_string(),
                coordinator,
            })
        });
        CqlMetrics {
            metrics,
            cluster: cluster.to_string(),
            requests,
            coordinators,
        }
    }

    /// Counts one request of `op` routed `route`.
    pub fn request(&self, op: Option<Opcode>, route: RouteKind) {
        let Some(i) = op.and_then(opcode_index) else {
            return;
        };
        let label = route.label();
        if let Some((_, c)) = self.requests[i].0.iter().find(|(r, _)| *r == label) {
            c.inc();
        }
    }

    /// Records how long a request of `op` took.
    pub fn latency(&self, op: Option<Opcode>, took: Duration) {
        if let Some(i) = op.and_then(opcode_index) {
            self.requests[i].1.observe(took.as_secs_f64());
        }
    }

    /// Counts a request with a token sent to a replica of it (`true`) or to another node.
    pub fn coordinator(&self, replica: bool) {
        self.coordinators[usize::from(!replica)].inc();
    }

    /// Counts the answer if it is an ERROR (`sluice_cql_errors_total{code}`).
    pub fn answer(&self, env: &Envelope) {
        if env.header.opcode != Opcode::Error as u8 {
            return;
        }
        let code = match super::backend::decode_response(env) {
            Ok(sluice_cql::Response::Error(e)) => e.code,
            _ => -1,
        };
        self.error_code(code);
    }

    /// Counts an ERROR answer of `code`.
    pub fn error_code(&self, code: i32) {
        self.metrics
            .cql_errors
            .get_or_create(&CodeLabels {
                cluster: self.cluster.clone(),
                code: crate::common::metrics::cql_error_name(code),
            })
            .inc();
    }

    /// Counts a control connection event.
    pub fn control_event(&self, event: &'static str) {
        self.metrics
            .cql_control_events
            .get_or_create(&EventLabels {
                cluster: self.cluster.clone(),
                event,
            })
            .inc();
    }

    /// Counts a statement prepared again after UNPREPARED.
    pub fn reprepare(&self, ok: bool) {
        self.metrics
            .cql_reprepares
            .get_or_create(&ClusterResultLabels {
                cluster: self.cluster.clone(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// The (connections, in flight) gauges of one node.
    pub fn node_gauges(&self, addr: SocketAddr) -> (Gauge, Gauge) {
        let labels = NodeLabels {
            cluster: self.cluster.clone(),
            node: addr.to_string(),
        };
        (
            self.metrics.cql_node_connections.get_or_create_owned(&labels),
            self.metrics.cql_node_inflight.get_or_create_owned(&labels),
        )
    }
}
