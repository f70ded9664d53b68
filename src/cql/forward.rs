//! Forwarding one request: the nodes to try in order, a shared connection to each, stream ids
//! remapped on the way, UNPREPARED answered by preparing the statement again on that node,
//! and requests lost with a connection sent to the next candidate (except LWTs). A request
//! that times out is not sent elsewhere (its node may still apply it, and the client's own
//! timeout is running): the client gets the error, and `max_consecutive_timeouts` in a row
//! mark the node down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_cql::codec::Envelope;
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::request::Prepare;
use sluice_cql::response::{error_code as ec, ErrorBody, ResultBody};
use sluice_cql::{Request, Response};
use tracing::debug;

use super::backend::{decode_response, OpenError, RequestError};
use super::health::secs;
use super::pool::PoolKey;
use super::prepared::PreparedInfo;
use super::route::{self, Route};
use super::CqlCluster;
use crate::common::health::{Source, Verdict};

/// Nodes one request is tried on before giving up.
pub(super) const MAX_ATTEMPTS: usize = 3;
/// How long a schema change's answer waits for the control connection to read the change.
const SCHEMA_WAIT: Duration = Duration::from_secs(2);

/// Builds a response envelope.
pub(super) fn envelope(version: u8, stream: i16, resp: &Response) -> Envelope {
    Envelope::new(
        Header::response(version, stream, resp.opcode()),
        resp.to_body(version),
    )
}

/// What a forwarded request needs, detached from the client connection.
pub(super) struct RequestCtx {
    pub cluster: Arc<CqlCluster>,
    pub key: PoolKey,
    pub version: u8,
}

impl RequestCtx {
    /// An error for the client, counted in `sluice_errors_total{reason}`.
    fn error(&self, env: &Envelope, reason: &'static str, e: ErrorBody) -> Envelope {
        self.cluster.error(reason);
        envelope(self.version, env.header.stream, &Response::Error(e))
    }

    /// Sends the request to the best node that takes it and returns the answer.
    pub async fn forward(&self, env: &Envelope, route: &Route) -> Envelope {
        let cluster = &self.cluster;
        let snap = cluster.snapshot();
        let local_dc = cluster.local_datacenter(&snap);
        let zone = cluster.config.zone.as_deref();
        let (order, replicas) =
            route::candidates_and_replicas(&snap, route, local_dc.as_deref(), zone, |a| {
                cluster.pools.inflight(a)
            });
        // `sluice_cql_coordinators_total`: whether the node that answers is a replica.
        let coordinated = |attempt: usize| {
            if route.partition.is_some() {
                cluster.cql_metrics.coordinator(attempt < replicas);
            }
        };
        let timeout = cluster.cql.request_timeout;
        let mut last = ErrorBody::new(ec::SERVER_ERROR, "sluice: no CQL node is known");
        for (attempt, i) in order.into_iter().take(MAX_ATTEMPTS).enumerate() {
            let addr = snap.nodes[i].addr;
            let conn = match cluster.pools.get(addr, &self.key, super::CQL_VERSION).await {
                Ok(c) => c,
                Err(OpenError::Unreachable { reason, .. }) => {
                    cluster.observe(
                        addr,
                        Verdict::down(Source::Connect, format!("unreachable: {reason}")),
                    );
                    last = ErrorBody::new(
                        ec::SERVER_ERROR,
                        format!("sluice: node {addr} is unreachable: {reason}"),
                    );
                    continue;
                }
                Err(OpenError::Refused { error, .. }) => return self.error(env, "backend_refused", error),
                Err(OpenError::NeedsAuth { authenticator, .. }) => {
                    return self.error(
                        env,
                        "backend_auth",
                        ErrorBody::new(ec::AUTH_ERROR, format!("the cluster requires {authenticator}")),
                    )
                }
            };
            let _inflight = cluster.pools.track(addr);
            match conn.request(env, timeout).await {
                Ok(resp) => {
                    cluster.pools.answered(addr);
                    let unprepared = match decode_response(&resp) {
                        Ok(Response::Error(e)) => e.unprepared_id(),
                        _ => None,
                    };
                    let Some(id) = unprepared else {
                        coordinated(attempt);
                        return resp;
                    };
                    let Some(info) = cluster.prepared.get(&id) else {
                        coordinated(attempt);
                        return resp;
                    };
                    debug!(node = %addr, "node does not know a prepared statement; preparing it again");
                    let reprepared = self.prepare_on(addr, &info).await;
                    cluster.cql_metrics.reprepare(reprepared);
                    if !reprepared {
                        coordinated(attempt);
                        return resp;
                    }
                    match conn.request(env, timeout).await {
                        Ok(r) => {
                            coordinated(attempt);
                            return r;
                        }
                        Err(e) => last = ErrorBody::new(ec::SERVER_ERROR, format!("sluice: {addr}: {e}")),
                    }
                }
                Err(RequestError::Timeout) => {
                    let limit = cluster.cql.max_consecutive_timeouts;
                    let in_a_row = cluster.pools.timed_out(addr);
                    if limit > 0 && in_a_row >= limit {
                        let why = format!(
                            "{in_a_row} requests in a row got no answer within {}",
                            secs(timeout)
                        );
                        cluster.observe(addr, Verdict::down(Source::RequestTimeouts, why));
                    }
                    return self.error(
                        env,
                        "timeout",
                        ErrorBody::new(
                            ec::SERVER_ERROR,
                            format!("sluice: no answer from {addr} within {timeout:?}"),
                        ),
                    );
                }
                Err(e @ (RequestError::Lost | RequestError::Busy)) => {
                    last = ErrorBody::new(ec::SERVER_ERROR, format!("sluice: {addr}: {e}"));
                    if e == RequestError::Lost && route.lwt {
                        // The node may have applied it: the client must decide.
                        return self.error(env, "backend_lost", last);
                    }
                }
            }
        }
        self.error(env, "no_node", last)
    }

    /// After a schema change by this client, waits (briefly) until the snapshot has it, so
    /// that the client's next request on the new keyspace or table is routed by token.
    pub async fn await_schema(&self, resp: &Envelope) {
        if resp.header.opcode != Opcode::Result as u8 {
            return;
        }
        let Ok(Response::Result(ResultBody::SchemaChange(sc))) = decode_response(resp) else {
            return;
        };
        if sc.change == "DROPPED" {
            return;
        }
        let known = |s: &super::snapshot::Snapshot| match (sc.target.as_str(), &sc.name) {
            ("KEYSPACE", _) => s.keyspaces.contains_key(&sc.keyspace),
            ("TABLE", Some(t)) => s.tables.contains_key(&(sc.keyspace.clone(), t.clone())),
            _ => true,
        };
        let deadline = tokio::time::Instant::now() + SCHEMA_WAIT;
        while !known(&self.cluster.snapshot()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Prepares a statement on one node again; true if it worked.
    async fn prepare_on(&self, addr: SocketAddr, info: &PreparedInfo) -> bool {
        let key = PoolKey {
            keyspace: info.prepare_keyspace.clone(),
            ..self.key.clone()
        };
        let Ok(conn) = self.cluster.pools.get(addr, &key, super::CQL_VERSION).await else {
            return false;
        };
        let req = Request::Prepare(Prepare {
            query: info.query.clone(),
            flags: u32::from(info.v5_keyspace.is_some()),
            keyspace: info.v5_keyspace.clone(),
        });
        let env = Envelope::new(
            Header::request(self.version, 0, Opcode::Prepare),
            req.to_body(self.version),
        );
        match conn.request(&env, self.cluster.cql.request_timeout).await {
            Ok(r) => matches!(decode_response(&r), Ok(Response::Result(ResultBody::Prepared(_)))),
            Err(_) => false,
        }
    }

    /// Caches a PREPARE's result and prepares it on the other nodes in the background.
    pub fn remember_prepared(&self, p: &Prepare, resp: &Envelope) {
        let Ok(Response::Result(ResultBody::Prepared(result))) = decode_response(resp) else {
            return;
        };
        let prepare_keyspace = if p.keyspace.is_some() {
            None
        } else {
            self.key.keyspace.clone()
        };
        let info = PreparedInfo::new(&p.query, prepare_keyspace, p.keyspace.clone(), &result);
        self.cluster.prepared.insert(result.id.clone(), info.clone());
        let ctx = RequestCtx {
            cluster: self.cluster.clone(),
            key: self.key.clone(),
            version: self.version,
        };
        tokio::spawn(async move {
            let snap = ctx.cluster.snapshot();
            for n in snap.nodes.iter().filter(|n| n.health.up) {
                let _ = tokio::time::timeout(Duration::from_secs(5), ctx.prepare_on(n.addr, &info)).await;
            }
        });
    }
}
