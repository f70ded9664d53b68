//! Node health of a CQL cluster: the evidence. Every source that finds a node down or up
//! (cluster events, the control connection, heartbeats on node connections, request
//! timeouts, failed connection attempts, the prober of down nodes) reports one [`Verdict`] to
//! [`CqlCluster::observe`], which applies it to the snapshot and reports a change through the
//! shared [`crate::common::health`] (one log line, `sluice_node_healthy`,
//! `sluice_node_health_changes_total`), and counts it as
//! `sluice_cql_control_events_total{event="node_down"|"node_up"}`.
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

use super::backend::RequestError;
use super::CqlCluster;
use crate::common::health::{self, Source, Verdict};

impl CqlCluster {
    /// Applies one observation of the node at `addr`. A node that goes down has its
    /// connections closed (requests waiting on them count as lost with the connection); the
    /// transition is logged and counted once, by whichever observation made it.
    pub(crate) fn observe(&self, addr: SocketAddr, verdict: Verdict) {
        let before = self.update(|s| s.with_verdict(addr, &verdict));
        let was_up = before.nodes.iter().find(|n| n.addr == addr).map(|n| n.health.up);
        self.pools.reset_timeouts(addr);
        if !verdict.is_up() {
            self.pools.close_node(addr);
        }
        if was_up != Some(!verdict.is_up()) {
            return;
        }
        health::announce(
            &self.metrics,
            "CQL",
            &self.config.name,
            &addr.to_string(),
            &verdict,
        );
        self.cql_metrics
            .control_event(if verdict.is_up() { "node_up" } else { "node_down" });
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
            .idle_connections(every, |a| snap.nodes.iter().any(|n| n.addr == a && n.health.up));
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
                    Verdict::down(
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
