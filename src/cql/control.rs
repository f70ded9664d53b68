//! The control connection of a CQL cluster: reads `system.local`, `system.peers(_v2)` and
//! `system_schema`, registers for TOPOLOGY_CHANGE, STATUS_CHANGE and SCHEMA_CHANGE, and
//! publishes a new snapshot on every change. Also re-probes nodes that are down.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_cql::codec::Envelope;
use sluice_cql::frame::{Header, Opcode};
use sluice_cql::request::{Query, QueryParams};
use sluice_cql::response::{error_code, Event, ResultBody, Rows};
use sluice_cql::ring::Strategy;
use sluice_cql::types::ColumnType;
use sluice_cql::{Request, Response};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::backend::{decode_response, BackendConn, OpenError, OpenOptions};
use super::snapshot::{ClusterInfo, NodeRow, PartitionKeys};
use super::CqlCluster;
use crate::common::health::{Source, Verdict};

/// How long to gather more SCHEMA_CHANGE events before reading the schema once.
const SCHEMA_DEBOUNCE: Duration = Duration::from_millis(20);
/// A full refresh even without events, in case one was missed.
const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// The control connection sends OPTIONS this often: a node that stops answering (a hung
/// process, a dropped network path) sends no EOF, and events would stop without a word.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A heartbeat unanswered for this long ends the control connection, which moves to another
/// node: with HEARTBEAT_EVERY, a silent node is left within 2 s.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a control session ended.
enum Ended {
    /// It was ready (ring read, events registered) and then lost: move on at once.
    Lost,
    /// It never got ready.
    NotReady,
}

/// Runs the control connection forever, moving to another node whenever its node fails.
pub async fn run(cluster: Arc<CqlCluster>) {
    let mut logged_waiting = false;
    loop {
        let snap = cluster.snapshot();
        let mut order: Vec<SocketAddr> = snap
            .nodes
            .iter()
            .filter(|n| n.health.up)
            .map(|n| n.addr)
            .collect();
        order.extend(snap.nodes.iter().filter(|n| !n.health.up).map(|n| n.addr));
        for s in cluster.current_seeds().await {
            if !order.contains(&s) {
                order.push(s);
            }
        }
        let mut needs_auth = false;
        let mut moved = false;
        for addr in order {
            match session(&cluster, addr).await {
                Ok(Ended::Lost) => {
                    // Start over at once with a fresh order: the lost node is down (or last).
                    moved = true;
                    break;
                }
                Ok(Ended::NotReady) => {}
                Err(OpenError::NeedsAuth { .. }) => {
                    needs_auth = true;
                    break;
                }
                Err(OpenError::Unreachable { reason, .. }) => {
                    cluster.observe(
                        addr,
                        Verdict::down(Source::Connect, format!("unreachable: {reason}")),
                    );
                }
                Err(e) => {
                    warn!(cluster = %cluster.config.name, node = %addr, error = %e, "control connection refused")
                }
            }
        }
        if needs_auth {
            cluster.update(|s| {
                let mut n = s.clone();
                if n.auth_required {
                    return None;
                }
                n.auth_required = true;
                n.generation += 1;
                Some(n)
            });
            if !logged_waiting {
                info!(cluster = %cluster.config.name, "the cluster requires authentication; waiting for a client's credentials (or set [clusters.cql] username/password)");
                logged_waiting = true;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), cluster.credentials_ready.notified()).await;
            continue;
        }
        if moved {
            continue;
        }
        tokio::time::sleep(cluster.config.probe_interval).await;
    }
}

async fn open(
    cluster: &CqlCluster,
    addr: SocketAddr,
    version: u8,
    events: Option<mpsc::UnboundedSender<Envelope>>,
    options: bool,
) -> Result<super::backend::Opened, OpenError> {
    let creds = cluster.credentials();
    BackendConn::open(
        addr,
        OpenOptions {
            version,
            keyspace: None,
            credentials: creds.as_ref(),
            cql_version: super::CQL_VERSION,
            timeout: cluster.config.connect_timeout,
            options,
            events,
            tls: &cluster.backend_tls,
            gauge: None,
            load: None,
        },
    )
    .await
}

/// One control session on `addr`; returns when the connection is lost.
async fn session(cluster: &Arc<CqlCluster>, addr: SocketAddr) -> Result<Ended, OpenError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Prefer v5; a node that refuses it gets v4. Only the connection's reader keeps a sender,
    // so the event channel closes when the connection ends.
    let (opened, version) = match open(cluster, addr, 5, Some(tx.clone()), true).await {
        Ok(o) => (o, 5),
        Err(OpenError::Refused { error, .. }) if error.code == error_code::PROTOCOL_ERROR => {
            (open(cluster, addr, 4, Some(tx), true).await?, 4)
        }
        Err(e) => return Err(e),
    };
    let conn = opened.conn;
    cluster.observe(addr, Verdict::up(Source::ControlConnection));
    cluster.update(|s| {
        if s.max_version == version && !s.auth_required {
            return None;
        }
        let mut n = s.clone();
        n.max_version = version;
        n.auth_required = false;
        Some(n)
    });
    let call = |req: Request| {
        let conn = conn.clone();
        async move {
            let env = Envelope::new(Header::request(version, 0, req.opcode()), req.to_body(version));
            let resp = conn
                .request(&env, Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())?;
            decode_response(&resp).map_err(|e| e.to_string())
        }
    };
    let register = Request::Register(vec![
        "TOPOLOGY_CHANGE".into(),
        "STATUS_CHANGE".into(),
        "SCHEMA_CHANGE".into(),
    ]);
    if !matches!(call(register).await, Ok(Response::Ready)) {
        conn.close();
        return Err(OpenError::Unreachable {
            addr,
            reason: "REGISTER failed".into(),
        });
    }
    if let Err(e) = refresh_ring(cluster, addr, version, &conn).await {
        warn!(cluster = %cluster.config.name, node = %addr, error = %e, "cannot read the ring");
        conn.close();
        return Ok(Ended::NotReady);
    }
    if let Err(e) = refresh_schema(cluster, version, &conn).await {
        warn!(cluster = %cluster.config.name, node = %addr, error = %e, "cannot read the schema");
    }
    info!(cluster = %cluster.config.name, node = %addr, version, nodes = cluster.snapshot().nodes.len(), "CQL control connection ready");
    cluster.cql_metrics.control_event("connected");
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut why = "closed by the node";
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = conn.lost() => break,
            _ = refresh.tick() => {
                if refresh_ring(cluster, addr, version, &conn).await.is_err() {
                    break;
                }
                let _ = refresh_schema(cluster, version, &conn).await;
                continue;
            }
            _ = heartbeat.tick() => {
                let beat = Envelope::new(
                    Header::request(version, 0, Opcode::Options),
                    Request::Options.to_body(version),
                );
                match conn.request(&beat, HEARTBEAT_TIMEOUT).await {
                    Ok(_) => continue,
                    Err(super::backend::RequestError::Timeout) => {
                        why = "no answer to a heartbeat";
                        break;
                    }
                    Err(super::backend::RequestError::Busy) => continue,
                    Err(super::backend::RequestError::Lost) => break,
                }
            }
        };
        let Some(env) = ev else { break };
        let mut schema_changed = false;
        let mut ring_changed = false;
        let mut pending = vec![env];
        // Gather a burst (DROP KEYSPACE sends one event per table) into one refresh.
        tokio::time::sleep(SCHEMA_DEBOUNCE).await;
        while let Ok(e) = rx.try_recv() {
            pending.push(e);
        }
        for env in pending {
            let Ok(Response::Event(ev)) = decode_response(&env) else {
                continue;
            };
            cluster.cql_metrics.control_event(match &ev {
                Event::StatusChange { .. } => "status_change",
                Event::TopologyChange { .. } => "topology_change",
                Event::SchemaChange(_) => "schema_change",
            });
            match ev {
                Event::StatusChange { change, address } => {
                    let target = node_addr(cluster, address);
                    let source = Source::StatusEvent;
                    if change == "DOWN" {
                        cluster.observe(target, Verdict::down(source, "STATUS_CHANGE DOWN"));
                    } else if change == "UP" {
                        cluster.observe(target, Verdict::up(source));
                    }
                }
                Event::TopologyChange { .. } => ring_changed = true,
                Event::SchemaChange(sc) => {
                    schema_changed = true;
                    let _ = cluster.schema_events.send(sc);
                }
            }
        }
        if ring_changed && refresh_ring(cluster, addr, version, &conn).await.is_err() {
            break;
        }
        if schema_changed && refresh_schema(cluster, version, &conn).await.is_err() {
            break;
        }
        if conn.is_closed() {
            break;
        }
    }
    conn.close();
    cluster.cql_metrics.control_event("lost");
    let _ = call;
    if why == "no answer to a heartbeat" {
        // The node keeps its socket but answers nothing: it is down until a probe's
        // handshake completes.
        let why = "control connection: no answer to a heartbeat";
        cluster.observe(addr, Verdict::down(Source::ControlConnection, why));
    } else if !cluster.pools_reachable(addr).await {
        let why = "control connection lost";
        cluster.observe(addr, Verdict::down(Source::ControlConnection, why));
    }
    warn!(cluster = %cluster.config.name, node = %addr, reason = why, "CQL control connection lost; moving to another node");
    Ok(Ended::Lost)
}

/// The native address sluice uses for an address a node reports (events carry the native
/// address; nodes share the seeds' port when they say nothing else).
fn node_addr(cluster: &CqlCluster, reported: SocketAddr) -> SocketAddr {
    let snap = cluster.snapshot();
    if snap.index_of(reported).is_some() {
        return reported;
    }
    snap.nodes
        .iter()
        .find(|n| n.addr.ip() == reported.ip())
        .map_or(reported, |n| n.addr)
}

impl CqlCluster {
    /// Whether a node still takes connections (after its control connection broke).
    async fn pools_reachable(&self, addr: SocketAddr) -> bool {
        tokio::time::timeout(self.config.connect_timeout, tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn query(conn: &BackendConn, version: u8, q: &str) -> Result<Rows, String> {
    let req = Request::Query(Query {
        query: q.to_string(),
        params: QueryParams::new(1),
    });
    let env = Envelope::new(Header::request(version, 0, Opcode::Query), req.to_body(version));
    let resp = conn
        .request(&env, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    match decode_response(&resp).map_err(|e| e.to_string())? {
        Response::Result(ResultBody::Rows(r)) => Ok(r),
        Response::Error(e) => Err(format!("{q}: {:#06x} {}", e.code, e.message)),
        other => Err(format!("{q}: unexpected {:?}", other.opcode())),
    }
}

/// Rows as maps from column name to value.
fn named_rows(rows: &Rows) -> Result<Vec<HashMap<String, Option<Bytes>>>, String> {
    let names: Vec<String> = rows.metadata.columns.iter().map(|c| c.name.clone()).collect();
    Ok(rows
        .rows()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| names.iter().cloned().zip(r).collect())
        .collect())
}

fn get<'a>(row: &'a HashMap<String, Option<Bytes>>, col: &str) -> Option<&'a Bytes> {
    row.get(col).and_then(|v| v.as_ref())
}

fn text(row: &HashMap<String, Option<Bytes>>, col: &str) -> Option<String> {
    get(row, col).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn ip(row: &HashMap<String, Option<Bytes>>, col: &str) -> Option<IpAddr> {
    let b = get(row, col)?;
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let a: [u8; 16] = b[..].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

fn int(row: &HashMap<String, Option<Bytes>>, col: &str) -> Option<i32> {
    let b = get(row, col)?;
    Some(i32::from_be_bytes(b[..].try_into().ok()?))
}

fn uuid(row: &HashMap<String, Option<Bytes>>, col: &str) -> Option<[u8; 16]> {
    get(row, col)?[..].try_into().ok()
}

/// Elements of a serialized `set<text>`/`list<text>`.
fn text_collection(b: &[u8]) -> Vec<String> {
    let mut r = sluice_cql::wire::Reader::new(Bytes::copy_from_slice(b));
    let Ok(n) = r.int_count("collection", 4) else {
        return Vec::new();
    };
    (0..n)
        .filter_map(|_| r.bytes("element").ok().flatten())
        .filter_map(|e| String::from_utf8(e.to_vec()).ok())
        .collect()
}

/// Pairs of a serialized `map<text, text>`.
fn text_map(b: &[u8]) -> Vec<(String, String)> {
    let mut r = sluice_cql::wire::Reader::new(Bytes::copy_from_slice(b));
    let Ok(n) = r.int_count("map", 8) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (Ok(Some(k)), Ok(Some(v))) = (r.bytes("key"), r.bytes("value")) else {
            break;
        };
        out.push((
            String::from_utf8_lossy(&k).into_owned(),
            String::from_utf8_lossy(&v).into_owned(),
        ));
    }
    out
}

fn tokens(row: &HashMap<String, Option<Bytes>>) -> Vec<i64> {
    get(row, "tokens")
        .map(|b| text_collection(b).iter().filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_default()
}

fn node_row(row: &HashMap<String, Option<Bytes>>, addr: SocketAddr) -> NodeRow {
    NodeRow {
        addr,
        host_id: uuid(row, "host_id"),
        datacenter: text(row, "data_center").unwrap_or_default(),
        rack: text(row, "rack").unwrap_or_default(),
        tokens: tokens(row),
    }
}

/// Reads system.local and the peers, and publishes the ring.
async fn refresh_ring(
    cluster: &CqlCluster,
    addr: SocketAddr,
    version: u8,
    conn: &BackendConn,
) -> Result<(), String> {
    let local = query(conn, version, "SELECT * FROM system.local WHERE key='local'").await?;
    let local = named_rows(&local)?;
    let local = local.first().ok_or("system.local is empty")?;
    let info = ClusterInfo {
        cluster_name: text(local, "cluster_name").unwrap_or_default(),
        partitioner: text(local, "partitioner").unwrap_or_default(),
        release_version: text(local, "release_version").unwrap_or_default(),
        cql_version: text(local, "cql_version").unwrap_or_else(|| "3.4.5".into()),
        schema_version: uuid(local, "schema_version"),
    };
    let mut rows = vec![node_row(local, addr)];
    let port = addr.port();
    match query(conn, version, "SELECT * FROM system.peers_v2").await {
        Ok(peers) => {
            for p in named_rows(&peers)? {
                let ip = ip(&p, "native_address").or_else(|| ip(&p, "peer"));
                let Some(ip) = ip else { continue };
                let port = int(&p, "native_port")
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(port);
                rows.push(node_row(&p, SocketAddr::new(ip, port)));
            }
        }
        Err(e) => {
            debug!(error = %e, "no system.peers_v2; reading system.peers");
            let peers = query(conn, version, "SELECT * FROM system.peers").await?;
            for p in named_rows(&peers)? {
                let ip = match ip(&p, "rpc_address") {
                    Some(ip) if !ip.is_unspecified() => ip,
                    _ => match ip(&p, "peer") {
                        Some(ip) => ip,
                        None => continue,
                    },
                };
                rows.push(node_row(&p, SocketAddr::new(ip, port)));
            }
        }
    }
    let seeds = cluster.pinned_seeds();
    cluster.update(|s| {
        let next = s.with_ring(&rows, info.clone(), seeds);
        (next.generation != s.generation).then_some(next)
    });
    cluster.map_pods();
    Ok(())
}

/// Reads keyspaces and partition keys, and publishes them.
async fn refresh_schema(cluster: &CqlCluster, version: u8, conn: &BackendConn) -> Result<(), String> {
    let ks_rows = query(
        conn,
        version,
        "SELECT keyspace_name, replication FROM system_schema.keyspaces",
    )
    .await?;
    let mut keyspaces = super::snapshot::Keyspaces::default();
    for r in named_rows(&ks_rows)? {
        let Some(name) = text(&r, "keyspace_name") else {
            continue;
        };
        let repl = get(&r, "replication").map(|b| text_map(b)).unwrap_or_default();
        keyspaces.insert(
            name,
            Strategy::from_replication(repl.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        );
    }
    let col_rows = query(
        conn,
        version,
        "SELECT keyspace_name, table_name, column_name, kind, position, type FROM system_schema.columns",
    )
    .await?;
    type Positioned = Vec<(i32, String, ColumnType)>;
    let mut keys: HashMap<(String, String), Positioned> = HashMap::new();
    let mut unroutable = Vec::new();
    for r in named_rows(&col_rows)? {
        if text(&r, "kind").as_deref() != Some("partition_key") {
            continue;
        }
        let (Some(ks), Some(t), Some(c)) = (
            text(&r, "keyspace_name"),
            text(&r, "table_name"),
            text(&r, "column_name"),
        ) else {
            continue;
        };
        let typ = text(&r, "type").and_then(|t| ColumnType::parse(&t));
        let Some(typ) = typ else {
            unroutable.push((ks, t));
            continue;
        };
        keys.entry((ks, t))
            .or_default()
            .push((int(&r, "position").unwrap_or(0), c, typ));
    }
    for k in unroutable {
        keys.remove(&k);
    }
    let tables: PartitionKeys = keys
        .into_iter()
        .map(|(k, mut cols)| {
            cols.sort_by_key(|c| c.0);
            (k, cols.into_iter().map(|(_, n, t)| (n, t)).collect())
        })
        .collect();
    cluster.update(|s| Some(s.with_schema(keyspaces.clone(), tables.clone())));
    Ok(())
}

/// Every probe interval, tries each down node again. A node that answers its handshake is
/// up: READY, but also AUTHENTICATE without credentials to give and an ERROR refusing the
/// credentials or the protocol version, since the node answered the protocol (credentials
/// are the cluster's, not the node's health; clients see the refusal). It stays down when
/// the connection or the handshake fails or times out, and when it answers that it cannot
/// serve (OVERLOADED, IS_BOOTSTRAPPING, SERVER_ERROR, ...).
pub async fn probe_down_nodes(cluster: Arc<CqlCluster>) {
    loop {
        tokio::time::sleep(cluster.config.probe_interval).await;
        let down: Vec<SocketAddr> = cluster
            .snapshot()
            .nodes
            .iter()
            .filter(|n| !n.health.up)
            .map(|n| n.addr)
            .collect();
        for addr in down {
            let version = cluster.snapshot().max_version.max(4);
            let alive = match open(&cluster, addr, version, None, false).await {
                Ok(o) => {
                    o.conn.close();
                    true
                }
                Err(OpenError::NeedsAuth { .. }) => true,
                Err(OpenError::Refused { error, .. }) => answered_alive(error.code),
                Err(OpenError::Unreachable { .. }) => false,
            };
            if alive {
                cluster.observe(addr, Verdict::up(Source::Probe));
            }
        }
    }
}

/// Whether a node that refused a probe's handshake with this error code can serve requests.
fn answered_alive(code: i32) -> bool {
    matches!(code, error_code::AUTH_ERROR | error_code::PROTOCOL_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_login_is_alive_an_overloaded_node_is_not() {
        assert!(answered_alive(error_code::AUTH_ERROR));
        assert!(answered_alive(error_code::PROTOCOL_ERROR));
        assert!(!answered_alive(error_code::OVERLOADED));
        assert!(!answered_alive(error_code::IS_BOOTSTRAPPING));
        assert!(!answered_alive(error_code::SERVER_ERROR));
    }
}
