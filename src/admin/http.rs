//! The admin HTTP listener: the status page `/`, `/metrics`, `/healthz`, `/readyz` and
//! `/topology`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::common::metrics::Metrics;
use crate::common::topology::Role;
use crate::discovery;
use crate::postgres::cluster::Cluster;

/// What the admin listener reports on.
pub struct AdminState {
    /// The clusters of the running configuration (swapped by a reload).
    pub clusters: ArcSwap<Vec<Arc<Cluster>>>,
    /// Each cluster's discovery status, by cluster name.
    pub discovery: ArcSwap<HashMap<String, Arc<discovery::Status>>>,
    /// The CQL clusters.
    pub cql: ArcSwap<Vec<Arc<crate::cql::CqlCluster>>>,
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun, so that /readyz turns away new traffic first.
    pub accepting: AtomicBool,
}

#[cfg(test)]
impl AdminState {
    /// A state with nothing running yet.
    pub fn empty() -> AdminState {
        AdminState {
            clusters: ArcSwap::from_pointee(Vec::new()),
            discovery: ArcSwap::from_pointee(HashMap::new()),
            cql: ArcSwap::from_pointee(Vec::new()),
            metrics: Arc::new(Metrics::new()),
            accepting: AtomicBool::new(true),
        }
    }
}

/// The role `/topology` and `SHOW NODES` give node `i`: `primary`, `replica`, `unknown`, or
/// `stale-primary` for a node that claims primary while another one gets the writes (during a
/// promotion).
pub fn role_label(snap: &crate::common::topology::Snapshot, i: usize) -> &'static str {
    let n = &snap.nodes[i];
    if n.role == Role::Primary && snap.primary() != Some(i) && n.health.up {
        "stale-primary"
    } else if n.role == Role::Primary && n.read_only && n.health.up {
        // Still the primary, but taking no writes (a planned switchover's first step).
        "read-only-primary"
    } else {
        match n.role {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// Serves the admin endpoints until the process ends.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req, peer)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn handle(state: &AdminState, req: &Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match req.uri().path() {
        "/" => {
            let page = crate::admin::status::render(&crate::admin::status::overview(state));
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, &state.metrics.encode());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match not_ready(state) {
            // A failing discovery source does not make sluice unready: it keeps serving the
            // last known topology, and taking every replica out of its Service during an API
            // server outage would turn that outage into a database outage. It is reported.
            None => text(StatusCode::OK, &format!("ready\n{}", degraded(state))),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}\n")),
        },
        "/topology" => {
            let mut r = Response::new(Full::new(Bytes::from(topology_json(state).to_string())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /metrics, /healthz, /readyz or /topology\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

/// Why sluice should not get traffic now: shutting down, or a cluster with no usable node.
fn not_ready(state: &AdminState) -> Option<String> {
    if !state.accepting.load(Ordering::Acquire) {
        return Some("shutting down".into());
    }
    let statuses = state.discovery.load();
    for c in state.clusters.load().iter() {
        if !c.topology.load().any_healthy() {
            let status = statuses.get(&c.config.name);
            return Some(match status.filter(|s| !s.is_synced()) {
                Some(s) => format!(
                    "cluster {:?}: {} discovery has not found the nodes yet{}",
                    c.config.name,
                    s.source,
                    s.failing().map(|(e, _)| format!(" ({e})")).unwrap_or_default()
                ),
                None => match status.map(|s| s.problems()).filter(|p| !p.is_empty()) {
                    Some(problems) => format!(
                        "cluster {:?} has no healthy node: {}",
                        c.config.name,
                        problems.join("; ")
                    ),
                    None => format!("cluster {:?} has no healthy node yet", c.config.name),
                },
            });
        }
    }
    state.cql.load().iter().find_map(|c| c.not_ready())
}

/// One line per cluster whose discovery source is failing while its last topology serves.
fn degraded(state: &AdminState) -> String {
    let mut out = String::new();
    let statuses = state.discovery.load();
    let mut names: Vec<_> = statuses.keys().collect();
    names.sort();
    for name in names {
        let s = &statuses[name];
        if let Some((error, since)) = s.failing() {
            out.push_str(&format!(
                "degraded: cluster {name:?}: {} discovery failing for {}s, serving the last known topology: {error}\n",
                s.source,
                since.as_secs()
            ));
        }
    }
    out
}

/// The JSON view of every cluster's nodes.
pub fn topology_json(state: &AdminState) -> serde_json::Value {
    let statuses = state.discovery.load();
    let mut clusters: Vec<_> = state
        .clusters
        .load()
        .iter()
        .map(|c| {
            let snap = c.topology.load();
            let idle = c.pools.idle_counts();
            let nodes: Vec<_> = snap
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let role = role_label(&snap, i);
                    json!({
                        "id": n.id,
                        "address": n.address,
                        "zone": n.zone,
                        "node": n.node,
                        "labeled_role": n.labeled_role,
                        "role": role,
                        "healthy": n.health.up,
                        "timeline": n.timeline,
                        "lsn": n.lsn.map(crate::admin::status::lsn_text),
                        "replay_lag_seconds": n.replay_lag_ms.map(|ms| ms as f64 / 1000.0),
                        "error": n.health.error,
                        "idle_connections": idle.get(&n.address).copied().unwrap_or(0),
                        "in_flight": n.load.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({
                "name": c.config.name,
                "protocol": "postgres",
                "listen": c.config.listen.to_string(),
                "generation": snap.generation,
                "discovery": statuses.get(&c.config.name).map(|s| {
                    let failing = s.failing();
                    json!({
                        "source": s.source,
                        "synced": s.is_synced(),
                        "healthy": failing.is_none(),
                        "error": failing.as_ref().map(|(e, _)| e.clone()),
                        "failing_seconds": failing.map(|(_, d)| d.as_secs()),
                        "problems": s.problems(),
                    })
                }),
                "nodes": nodes,
            })
        })
        .collect();
    clusters.extend(state.cql.load().iter().map(|c| c.topology_json()));
    json!({ "clusters": clusters })
}
