//! Node health, one mechanism for both protocols: whatever notices that a node is down or up
//! (a probe, a failed connection attempt, a cluster event, a heartbeat, request timeouts)
//! reports a [`Verdict`] with its [`Source`]; the protocol applies it to its topology snapshot
//! with [`Health::apply`], and a change is [`announce`]d once: one log line (WARN when the node
//! goes down, with the source and the reason; INFO when it is back), the
//! `sluice_node_healthy{cluster,node}` gauge and
//! `sluice_node_health_changes_total{cluster,node,state}`.
//!
//! What counts as evidence differs by protocol and lives with it (PostgreSQL: probes in
//! `src/postgres/cluster/probes.rs`, failed connects in `cluster/attach.rs`; CQL:
//! `src/cql/health.rs`, `control.rs`, `forward.rs`); the rule for a change and how it is
//! reported are here.

use tracing::{info, warn};

use super::metrics::{Metrics, NodeLabels, NodeStateLabels};

/// Who noticed a node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The periodic probe (PostgreSQL: a login and a query; CQL: the prober of down nodes, a
    /// handshake that gets any answer).
    Probe,
    /// Opening a connection failed (for a client's request, USE, a login check, the control
    /// connection).
    Connect,
    /// A STATUS_CHANGE event from the cluster (CQL gossip).
    StatusEvent,
    /// The CQL control connection: opened on the node, lost, or its heartbeat unanswered.
    ControlConnection,
    /// A connection's heartbeat got no answer within its timeout.
    Heartbeat,
    /// Several requests in a row got no answer within the request timeout.
    RequestTimeouts,
}

impl Source {
    /// The name logged in the `source` field.
    pub fn name(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Connect => "connect",
            Source::StatusEvent => "status_event",
            Source::ControlConnection => "control_connection",
            Source::Heartbeat => "heartbeat",
            Source::RequestTimeouts => "request_timeouts",
        }
    }
}

/// What one source learned about one node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Up { source: Source },
    Down { source: Source, error: String },
}

impl Verdict {
    pub fn up(source: Source) -> Verdict {
        Verdict::Up { source }
    }

    pub fn down(source: Source, error: impl Into<String>) -> Verdict {
        Verdict::Down {
            source,
            error: error.into(),
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self, Verdict::Up { .. })
    }

    pub fn source(&self) -> Source {
        match self {
            Verdict::Up { source } | Verdict::Down { source, .. } => *source,
        }
    }
}

/// A node's health as a topology snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Why the node was last found down (kept while it is down).
    pub error: Option<String>,
}

impl Health {
    /// A node nobody has seen yet: `up` is what the protocol assumes until evidence arrives.
    pub fn assumed(up: bool) -> Health {
        Health { up, error: None }
    }

    /// Applies a verdict; true when the node changed between up and down, or was found down
    /// for the first time (a node assumed down that nobody has seen yet has no reason).
    pub fn apply(&mut self, verdict: &Verdict) -> bool {
        let was = self.up;
        let unseen = !self.up && self.error.is_none();
        match verdict {
            Verdict::Up { .. } => {
                self.up = true;
                self.error = None;
            }
            Verdict::Down { error, .. } => {
                self.up = false;
                self.error = Some(error.clone());
            }
        }
        was != self.up || (unseen && !self.up)
    }
}

/// Reports a node's change between up and down: one log line and the metrics. `protocol` is
/// the name users know ("PostgreSQL", "CQL").
pub fn announce(metrics: &Metrics, protocol: &str, cluster: &str, node: &str, verdict: &Verdict) {
    let source = verdict.source().name();
    match verdict {
        Verdict::Up { .. } => {
            info!(%cluster, %node, source, "{protocol} node is up")
        }
        Verdict::Down { error, .. } => {
            warn!(%cluster, %node, source, reason = %error, "{protocol} node is down; skipping it until it answers again")
        }
    }
    let labels = NodeLabels {
        cluster: cluster.to_string(),
        node: node.to_string(),
    };
    metrics
        .node_healthy
        .get_or_create(&labels)
        .set(i64::from(verdict.is_up()));
    metrics
        .node_health_changes
        .get_or_create(&NodeStateLabels {
            cluster: labels.cluster,
            node: labels.node,
            state: if verdict.is_up() { "up" } else { "down" },
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_between_up_and_down_counts() {
        let mut h = Health::assumed(true);
        assert!(!h.apply(&Verdict::up(Source::Probe)));
        assert!(h.apply(&Verdict::down(Source::Connect, "refused")));
        assert_eq!(h.error.as_deref(), Some("refused"));
        assert!(!h.apply(&Verdict::down(Source::Probe, "timed out")), "still down");
        assert_eq!(h.error.as_deref(), Some("timed out"), "the latest reason is kept");
        assert!(h.apply(&Verdict::up(Source::StatusEvent)));
        assert_eq!(h, Health::assumed(true));
    }

    #[test]
    fn a_node_assumed_down_is_reported_when_first_found_down() {
        let mut h = Health::assumed(false);
        assert!(h.apply(&Verdict::down(Source::Probe, "connection refused")));
        assert!(!h.apply(&Verdict::down(Source::Probe, "connection refused")));
        let mut h = Health::assumed(false);
        assert!(h.apply(&Verdict::up(Source::Probe)));
    }
}
