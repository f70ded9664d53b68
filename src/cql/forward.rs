//! A client's request in two hops: the client's reader routes it and writes it into a node
//! connection's outbox ([`Inflight::dispatch`], stream id remapped there), and that
//! connection's reader hands the answer to the client's outbox ([`Inflight::answered`],
//! stream id mapped back); an outbox writes into its socket from the producer's own task
//! when the socket is idle ([`super::outbox`]). No task, channel or timer per request: a
//! task is spawned only on the rare paths (a connection to open, a request to send again
//! that must wait for one, a statement to prepare again after UNPREPARED, a schema change to
//! wait for), and one sweep per cluster times requests out ([`sweep_timeouts`]).
//!
//! The rules, as before the two hops: requests lost with a connection go to the next
//! candidate (except LWTs: the node may have applied it), up to [`MAX_ATTEMPTS`] nodes. A
//! request that times out is not sent elsewhere (its node may still apply it, and the
//! client's own timeout is running): the client gets the error, and
//! `max_consecutive_timeouts` in a row mark the node down.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sluice_cql::codec::Envelope;
use sluice_cql::frame::{flags, Header, Opcode};
use sluice_cql::request::Extensions;
use sluice_cql::response::{error_code as ec, ErrorBody, ResultBody};
use sluice_cql::{Request, Response};
use tokio::sync::Semaphore;
use tracing::debug;

use super::backend::{decode_response, ConnInfo, OpenError, RequestError};
use super::health::secs;
use super::outbox::{Out, Outbox};
use super::pool::{Pick, PoolKey};
use super::prepared::PreparedInfo;
use super::route::{self, Route};
use super::snapshot::Snapshot;
use super::CqlCluster;
use crate::common::health::{Source, Verdict};

use super::prepared::{prepare_on, remember_prepared};

/// Nodes one request is tried on before giving up.
pub(super) const MAX_ATTEMPTS: usize = 3;

/// How long a schema change's answer waits for the control connection to read the change.
const SCHEMA_WAIT: Duration = Duration::from_secs(2);

/// RESULT kinds that need more than passing the answer on.
const RESULT_PREPARED: i32 = 4;
const RESULT_SCHEMA_CHANGE: i32 = 5;

/// Builds a response envelope.
pub(super) fn envelope(version: u8, stream: i16, resp: &Response) -> Envelope {
    Envelope::new(
        Header::response(version, stream, resp.opcode()),
        resp.to_body(version),
    )
}

/// What a client connection's requests in flight share: where answers go and how many may
/// be in flight.
pub(super) struct ClientLink {
    pub cluster: Arc<CqlCluster>,
    /// The client connection's write half.
    pub out: Arc<Outbox>,
    /// `max_requests_per_client`: a request takes one before it is routed (the client's
    /// reader waits when none is left) and gives it back when it is answered.
    pub permits: Semaphore,
}

/// A client's request between its routing and its answer: it waits in the stream id slot of
/// the node connection it was written to.
pub(super) struct Inflight {
    client: Arc<ClientLink>,
    /// The request as the client sent it (its stream id and version in the header).
    request: Envelope,
    route: Route,
    /// When the client's reader got it (`sluice_cql_request_duration_seconds`).
    started: Instant,
    /// When it was last written to a node (its `request_timeout` runs from there), in
    /// microseconds after `started` (saturating at 71 minutes): 4 bytes instead of 16.
    sent_after_us: u32,
    /// Nodes that failed it (lost connection, no free stream id, unreachable).
    tried: Tried,
    /// Whether the node it was written to is a replica of its partition.
    replica: bool,
    /// Sent again after preparing its statement again on the node it waits on: a second
    /// UNPREPARED from that node goes to the client.
    reprepared: bool,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.client.permits.add_permits(1);
    }
}

impl Inflight {
    /// A request whose permit the client's reader has taken (and forgotten).
    pub(super) fn new(
        client: Arc<ClientLink>,
        request: Envelope,
        route: Route,
        started: Instant,
    ) -> Inflight {
        Inflight {
            client,
            request,
            route,
            started,
            sent_after_us: 0,
            tried: Tried::default(),
            replica: false,
            reprepared: false,
        }
    }

    /// The request as the client sent it.
    pub(super) fn request(&self) -> &Envelope {
        &self.request
    }

    /// When it was last written to a node.
    pub(super) fn sent(&self) -> Instant {
        self.started + Duration::from_micros(u64::from(self.sent_after_us))
    }

    /// Notes that it is written to a node now.
    fn sent_now(&mut self) {
        let us = Instant::now().saturating_duration_since(self.started).as_micros();
        self.sent_after_us = u32::try_from(us).unwrap_or(u32::MAX);
    }

    fn version(&self) -> u8 {
        self.request.header.version
    }

    /// Writes the request to the best candidate node that has an open connection; when the
    /// best one has none, a task opens it and goes on from there. Never waits.
    pub(super) fn dispatch(self, key: &PoolKey, snap: &Snapshot) {
        self.dispatch_after(key, snap, None);
    }

    /// [`Inflight::dispatch`] after a node failed it with `last` (`None`: no node tried yet;
    /// the error for that case is made only if it is needed: no allocation per request).
    fn dispatch_after(mut self, key: &PoolKey, snap: &Snapshot, mut last: Option<ErrorBody>) {
        let cluster = self.client.cluster.clone();
        if self.tried.is_empty() {
            // The best node first, without building the list of all of them.
            let Some((i, replica)) = best_candidate(&cluster, snap, &self.route) else {
                return self.fail("no_node", last.unwrap_or_else(no_node));
            };
            match self.try_node(&cluster, key, snap.nodes[i].addr, replica, last) {
                Some(back) => (self, last) = back,
                None => return,
            }
        }
        let (order, replicas) = candidates(&cluster, snap, &self.route);
        for (pos, i) in order.into_iter().enumerate() {
            if self.tried.len() >= MAX_ATTEMPTS {
                break;
            }
            let addr = snap.nodes[i].addr;
            if self.tried.contains(&addr) {
                continue;
            }
            match self.try_node(&cluster, key, addr, pos < replicas, last) {
                Some(back) => (self, last) = back,
                None => return,
            }
        }
        self.fail("no_node", last.unwrap_or_else(no_node));
    }

    /// Writes the request to `addr` if it has an open connection, or hands it to a task that
    /// opens one and goes on from there; the request back (with the error to report if no
    /// other node takes it) when the node could not take it, `None` when it is on its way.
    fn try_node(
        mut self,
        cluster: &Arc<CqlCluster>,
        key: &PoolKey,
        addr: SocketAddr,
        replica: bool,
        last: Option<ErrorBody>,
    ) -> Option<(Inflight, Option<ErrorBody>)> {
        let conn = match cluster.pools.try_get(addr, key) {
            Pick::Ready(c) => c,
            Pick::Grow(c) => {
                let (cluster, key) = (cluster.clone(), key.clone());
                tokio::spawn(async move { cluster.pools.grow(addr, &key, super::CQL_VERSION).await });
                c
            }
            Pick::Open => {
                tokio::spawn(self.dispatch_waiting(key.clone(), last));
                return None;
            }
        };
        self.replica = replica;
        match conn.send(self) {
            Ok(()) => None,
            // The connection's reader has it now, and fails it as lost.
            Err((_, None)) => None,
            Err((e, Some(back))) => back.not_sent(addr, e).map(|(back, e)| (back, Some(e))),
        }
    }

    /// [`Inflight::dispatch`] when a connection has to be opened first: waits for it.
    async fn dispatch_waiting(mut self, key: PoolKey, last: Option<ErrorBody>) {
        let mut last = last.unwrap_or_else(no_node);
        let cluster = self.client.cluster.clone();
        let snap = cluster.snapshot();
        let (order, replicas) = candidates(&cluster, &snap, &self.route);
        for (pos, i) in order.into_iter().enumerate() {
            if self.tried.len() >= MAX_ATTEMPTS {
                break;
            }
            let addr = snap.nodes[i].addr;
            if self.tried.contains(&addr) {
                continue;
            }
            let conn = match cluster.pools.get(addr, &key, super::CQL_VERSION).await {
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
                    self.tried.push(addr);
                    continue;
                }
                Err(OpenError::Refused { error, .. }) => return self.fail("backend_refused", error),
                Err(OpenError::NeedsAuth { authenticator, .. }) => {
                    let e = ErrorBody::new(ec::AUTH_ERROR, format!("the cluster requires {authenticator}"));
                    return self.fail("backend_auth", e);
                }
            };
            self.replica = pos < replicas;
            self.sent_now();
            match conn.send(self) {
                Ok(()) | Err((_, None)) => return,
                Err((e, Some(back))) => match back.not_sent(addr, e) {
                    Some((back, e)) => (self, last) = (back, e),
                    None => return,
                },
            }
        }
        self.fail("no_node", last);
    }

    /// Notes a node that could not take the request: the request back with the error to
    /// report if no other node takes it, or `None` when it was failed here (an LWT whose
    /// connection was lost).
    fn not_sent(mut self, addr: SocketAddr, e: RequestError) -> Option<(Inflight, ErrorBody)> {
        let last = ErrorBody::new(ec::SERVER_ERROR, format!("sluice: {addr}: {e}"));
        self.tried.push(addr);
        // Another node gets its own chance to learn the statement.
        self.reprepared = false;
        if e == RequestError::Lost && self.route.lwt {
            // The node may have applied it: the client must decide.
            self.fail("backend_lost", last);
            return None;
        }
        Some((self, last))
    }

    /// The node answered; its answer was read at `at`.
    pub(super) fn answered(self, resp: Envelope, conn: &ConnInfo, at: Instant) {
        conn.load.answered();
        let op = resp.header.opcode;
        if op == Opcode::Error as u8 {
            if !self.reprepared {
                if let Some(info) = self.unprepared(&resp) {
                    tokio::spawn(self.reprepare(info, resp, conn.addr, conn.key.clone()));
                    return;
                }
            }
        } else if op == Opcode::Result as u8 {
            match result_kind(&resp) {
                Some(RESULT_SCHEMA_CHANGE) => {
                    tokio::spawn(async move {
                        await_schema(&self.client.cluster, &resp).await;
                        self.deliver(resp, Instant::now());
                    });
                    return;
                }
                Some(RESULT_PREPARED) => self.remember(&resp, &conn.key),
                _ => {}
            }
        }
        self.deliver(resp, at);
    }

    /// The connection it waited on was lost: sent to the next candidate, or failed (an LWT,
    /// or no candidate left).
    pub(super) fn lost(self, conn: &ConnInfo) {
        self.elsewhere(conn.addr, &conn.key, RequestError::Lost);
    }

    fn elsewhere(self, addr: SocketAddr, key: &PoolKey, e: RequestError) {
        let Some((mut this, last)) = self.not_sent(addr, e) else {
            return;
        };
        this.sent_now();
        let snap = this.client.cluster.snapshot();
        this.dispatch_after(key, &snap, Some(last));
    }

    /// No answer within `timeout`: the client gets an error, and the node's timeouts in a row
    /// may mark it down.
    pub(super) fn timed_out(self, conn: &ConnInfo, timeout: Duration) {
        let cluster = &self.client.cluster;
        let limit = cluster.cql.max_consecutive_timeouts;
        let in_a_row = conn.load.timed_out();
        if limit > 0 && in_a_row >= limit {
            let why = format!(
                "{in_a_row} requests in a row got no answer within {}",
                secs(timeout)
            );
            cluster.observe(conn.addr, Verdict::down(Source::RequestTimeouts, why));
        }
        let e = ErrorBody::new(
            ec::SERVER_ERROR,
            format!("sluice: no answer from {} within {timeout:?}", conn.addr),
        );
        self.fail("timeout", e);
    }

    /// The statement of an UNPREPARED answer, if sluice knows it.
    fn unprepared(&self, resp: &Envelope) -> Option<Arc<PreparedInfo>> {
        let Ok(Response::Error(e)) = decode_response(resp) else {
            return None;
        };
        self.client.cluster.prepared.get(&e.unprepared_id()?)
    }

    /// Prepares the statement again on the node that answered UNPREPARED, then sends the
    /// request there again (or gives the client the UNPREPARED when that fails).
    async fn reprepare(mut self, info: Arc<PreparedInfo>, resp: Envelope, addr: SocketAddr, key: PoolKey) {
        debug!(node = %addr, "node does not know a prepared statement; preparing it again");
        let cluster = self.client.cluster.clone();
        let prepared = prepare_on(&cluster, &key, self.version(), addr, &info).await;
        cluster.cql_metrics.reprepare(prepared.is_ok());
        match prepared {
            Ok(()) => {}
            // The node lost the connection or did not answer: like a lost request, the next
            // candidate gets it (not an LWT, which gets the UNPREPARED: nothing was applied,
            // and its driver prepares again).
            Err(Some(e)) if !self.route.lwt => return self.elsewhere(addr, &key, e),
            // The node refused the statement: the client sees why.
            Err(_) => return self.deliver(resp, Instant::now()),
        }
        self.reprepared = true;
        self.sent_now();
        match cluster.pools.get(addr, &key, super::CQL_VERSION).await {
            Ok(conn) => match conn.send(self) {
                Ok(()) | Err((_, None)) => {}
                Err((e, Some(back))) => back.elsewhere(addr, &key, e),
            },
            Err(_) => self.elsewhere(addr, &key, RequestError::Lost),
        }
    }

    /// Remembers a PREPARE's result (and prepares it on the other nodes in the background).
    fn remember(&self, resp: &Envelope, key: &PoolKey) {
        let h = &self.request.header;
        let Ok((_, body)) = Extensions::split(h, self.request.body.clone()) else {
            return;
        };
        if let Ok(Request::Prepare(p)) = Request::decode(h.version, h.opcode, body) {
            remember_prepared(&self.client.cluster, key, h.version, &p, resp);
        }
    }

    /// Passes a node's answer on (`at`: when it was read).
    fn deliver(self, resp: Envelope, at: Instant) {
        if self.route.partition.is_some() {
            self.client.cluster.cql_metrics.coordinator(self.replica);
        }
        self.finish(resp, at);
    }

    /// Answers the client with an error sluice made, counted in `sluice_errors_total{reason}`.
    fn fail(self, reason: &'static str, e: ErrorBody) {
        self.client.cluster.error(reason);
        let resp = envelope(self.version(), self.request.header.stream, &Response::Error(e));
        self.finish(resp, Instant::now());
    }

    /// Writes the answer to the client; `at` ends the request's latency.
    fn finish(self, mut resp: Envelope, at: Instant) {
        resp.header.stream = self.request.header.stream;
        resp.header.version = self.version();
        let m = &self.client.cluster.cql_metrics;
        m.answer(&resp);
        m.latency(
            self.request.header.opcode(),
            at.saturating_duration_since(self.started),
        );
        let _ = self.client.out.push(Out::Envelope(resp));
    }
}

/// After a schema change by this client, waits (briefly) until the snapshot has it, so
/// that the client's next request on the new keyspace or table is routed by token.
async fn await_schema(cluster: &CqlCluster, resp: &Envelope) {
    let Ok(Response::Result(ResultBody::SchemaChange(sc))) = decode_response(resp) else {
        return;
    };
    if sc.change == "DROPPED" {
        return;
    }
    let known = |s: &Snapshot| match (sc.target.as_str(), &sc.name) {
        ("KEYSPACE", _) => s.keyspaces.contains_key(&sc.keyspace),
        ("TABLE", Some(t)) => s.tables.contains_key(&(sc.keyspace.clone(), t.clone())),
        _ => true,
    };
    let deadline = tokio::time::Instant::now() + SCHEMA_WAIT;
    while !known(&cluster.snapshot()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The nodes to try for `route`, best first, and how many of them are its replicas.
fn candidates(cluster: &CqlCluster, snap: &Snapshot, route: &Route) -> (Vec<usize>, usize) {
    let local_dc = cluster.local_datacenter_in(snap);
    let zone = cluster.config.zone.as_deref();
    route::candidates_and_replicas(snap, route, local_dc, zone, |a| cluster.pools.inflight(a))
}

/// The first of [`candidates`], without building the list.
fn best_candidate(cluster: &CqlCluster, snap: &Snapshot, route: &Route) -> Option<(usize, bool)> {
    let local_dc = cluster.local_datacenter_in(snap);
    let zone = cluster.config.zone.as_deref();
    route::best_candidate(snap, route, local_dc, zone, |a| cluster.pools.inflight(a))
}

/// The nodes that failed a request. Nearly every request has none, so it carries one pointer
/// for them, not a `Vec`: a request is moved several times on its way (client reader, the node
/// connection's slot, its reader), and at 120 bytes instead of 152 each move is a few
/// register copies instead of a call to `memcpy`.
// The box is the point: one pointer in the request, the `Vec` (three words) only behind it.
#[allow(clippy::box_collection)]
#[derive(Default)]
struct Tried(Option<Box<Vec<SocketAddr>>>);

impl Tried {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.len())
    }

    fn contains(&self, addr: &SocketAddr) -> bool {
        self.0.as_ref().is_some_and(|v| v.contains(addr))
    }

    fn push(&mut self, addr: SocketAddr) {
        self.0.get_or_insert_with(Default::default).push(addr);
    }
}

/// What a request that no node took is failed with when no node was tried.
fn no_node() -> ErrorBody {
    ErrorBody::new(ec::SERVER_ERROR, "sluice: no CQL node is known")
}

/// The kind of a RESULT answer (read in place unless extensions precede it).
fn result_kind(resp: &Envelope) -> Option<i32> {
    let h = &resp.header;
    let ext = flags::TRACING | flags::WARNING | flags::CUSTOM_PAYLOAD;
    let body = if h.flags & ext == 0 {
        resp.body.clone()
    } else {
        Extensions::split(h, resp.body.clone()).ok()?.1
    };
    let kind: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(i32::from_be_bytes(kind))
}

/// Fails clients' requests that got no answer within `request_timeout`, for as long as the
/// cluster exists (requests in flight keep it alive, so none is left waiting forever). The
/// sweep runs every tenth of the timeout (10–100 ms): a request times out between
/// `request_timeout` and that much later.
pub(super) async fn sweep_timeouts(cluster: Weak<CqlCluster>) {
    let Some(timeout) = cluster.upgrade().map(|c| c.cql.request_timeout) else {
        return;
    };
    let every = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let Some(cutoff) = Instant::now().checked_sub(timeout) else {
            continue;
        };
        for conn in cluster.pools.busy_connections() {
            for req in conn.expired(cutoff) {
                req.timed_out(conn.info(), timeout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};
    use sluice_cql::response::SchemaChange;

    use super::*;

    fn result(flags: u8, prefix: &[u8], body: ResultBody) -> Envelope {
        let mut b = BytesMut::new();
        b.put_slice(prefix);
        b.put_slice(&Response::Result(body).to_body(4));
        let mut h = Header::response(4, 3, Opcode::Result);
        h.flags = flags;
        Envelope::new(h, b.freeze())
    }

    /// A request in flight is moved several times on its way; up to 128 bytes a move is inlined
    /// (eight 16-byte copies), above it is a call to `memcpy` (measured: ~33 instructions each,
    /// nine per request at 152 bytes).
    #[test]
    fn a_request_in_flight_fits_an_inlined_move() {
        assert!(std::mem::size_of::<super::Inflight>() <= 128);
    }

    #[test]
    fn result_kind_is_read_in_place_and_after_extensions() {
        let sc = ResultBody::SchemaChange(SchemaChange {
            change: "CREATED".into(),
            target: "KEYSPACE".into(),
            keyspace: "ks".into(),
            name: None,
            arguments: None,
        });
        assert_eq!(result_kind(&result(0, &[], ResultBody::Void)), Some(1));
        assert_eq!(
            result_kind(&result(0, &[], sc.clone())),
            Some(RESULT_SCHEMA_CHANGE)
        );
        // A traced answer starts with its 16-byte tracing id.
        assert_eq!(
            result_kind(&result(flags::TRACING, &[7; 16], sc)),
            Some(RESULT_SCHEMA_CHANGE)
        );
        // Warnings: a [string list] of one "w".
        let warned = result(flags::WARNING, &[0, 1, 0, 1, b'w'], ResultBody::Void);
        assert_eq!(result_kind(&warned), Some(1));
        let short = Envelope::new(
            Header::response(4, 3, Opcode::Result),
            Bytes::from_static(&[0, 0]),
        );
        assert_eq!(result_kind(&short), None);
    }
}
