//! Node health of a CQL cluster, in one place: every source that finds a node down or up
//! (cluster events, the control connection, heartbeats on node connections, request
//! timeouts, failed connection attempts, the prober of down nodes) reports one
//! [`Observation`] to [`CqlCluster::observe`], which updates the snapshot, logs the change
//! once and counts it (`sluice_cql_control_events_total{event="node_down"|"node_up"}`,
//! `sluice_node_healthy`).
//!
//! The rule: a node is down after one STATUS_CHANGE DOWN, one failed connection attempt, one
//! heartbeat (OPTIONS) left unanswered for `heartbeat_timeout`, or `max_consecutive_timeouts`
//! requests in a row without an answer within `request_timeout`. It is up again when the
//! cluster says STATUS_CHANGE UP, a control connection opens on it, or a probe gets an answer
//! to its handshake (a node that refuses the credentials has answered: it is alive).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_cql::codec::Envelope;
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::Request;
use tracing::{info, warn};

use super::backend::RequestError;
use super::CqlCluster;

/// Who noticed a node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A STATUS_CHANGE event from the cluster (gossip).
    StatusEvent,
    /// The control connection: opened on the node, lost, or its heartbeat unanswered.
    ControlConnection,
    /// A node connection's heartbeat (OPTIONS) got no answer within `heartbeat_timeout`.
    Heartbeat,
    /// `max_consecutive_timeouts` requests in a row got no answer within `request_timeout`.
    RequestTimeouts,
    /// Opening a connection failed (a request, USE, a login check, the control connection).
    Connect,
    /// The prober of down nodes got an answer to its handshake.
    Probe,
}

impl Source {
    /// The name logged in the `source` field.
    pub fn name(self) -> &'static str {
        match self {
            Source::StatusEvent => "status_event",
            Source::ControlConnection => "control_connection",
            Source::Heartbeat => "heartbeat",
            Source::RequestTimeouts => "request_timeouts",
            Source::Connect => "connect",
            Source::Probe => "probe",
        }
    }
}

/// What one source learned about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Up { source: Source },
    Down { source: Source, error: String },
}

impl Observation {
    pub fn down(source: Source, error: impl Into<String>) -> Observation {
        Observation::Down {
            source,
            error: error.into(),
        }
    }
}

impl CqlCluster {
    /// Applies one observation of the node at `addr`. A node that goes down has its
    /// connections closed (requests waiting on them count as lost with the connection); the
    /// transition is logged and counted once, by whichever observation made it.
    pub(crate) fn observe(&self, addr: SocketAddr, obs: Observation) {
        let (up, error, source) = match &obs {
            Observation::Up { source } => (true, None, *source),
            Observation::Down { source, error } => (false, Some(error.clone()), *source),
        };
        let before = self.update(|s| s.with_status(addr, up, error.clone()));
        let was_up = before.nodes.iter().find(|n| n.addr == addr).map(|n| n.up);
        self.pools.reset_timeouts(addr);
        if !up {
            self.pools.close_node(addr);
        }
        if was_up != Some(!up) {
            return;
        }
        if up {
            info!(cluster = %self.config.name, node = %addr, source = source.name(), "CQL node is up");
            self.cql_metrics.control_event("node_up");
        } else {
            let reason = error.unwrap_or_default();
            warn!(cluster = %self.config.name, node = %addr, source = source.name(), %reason, "CQL node is down; skipping it until it answers again");
            self.cql_metrics.control_event("node_down");
        }
    }
}

/// Every `heartbeat_interval`, sends OPTIONS on each connection to an up node that has
/// received nothing for that long (as drivers' idle heartbeat does); one left unanswered for
/// `heartbeat_timeout` marks its node down. A frozen node (its port accepts, nothing answers)
/// is noticed within `heartbeat_interval` + `heartbeat_timeout` of its last answer.
pub async fn heartbeat(cluster: Arc<CqlCluster>) {
    let every = cluster.cql.heartbeat_interval;
    let timeout = cluster.cql.heartbeat_timeout;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = cluster.snapshot();
        let idle = cluster
            .pools
            .idle_connections(every, |a| snap.nodes.iter().any(|n| n.addr == a && n.up));
        if idle.is_empty() {
            continue;
        }
        let beats = idle.into_iter().map(|(addr, version, conn)| async move {
            let beat = Envelope::new(
                Header::request(version, 0, Opcode::Options),
                Request::Options.to_body(version),
            );
            (addr, conn.request(&beat, timeout).await.err())
        });
        for (addr, err) in futures_util::future::join_all(beats).await {
            if err == Some(RequestError::Timeout) {
                cluster.observe(
                    addr,
                    Observation::down(
                        Source::Heartbeat,
                        format!("no answer to a heartbeat (OPTIONS) within {}", secs(timeout)),
                    ),
                );
            }
        }
    }
}

/// A duration as humans write it in the config (`2s`, `500ms`).
pub fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
