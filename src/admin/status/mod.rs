//! What the console's `SHOW NODES`/`SHOW POOLS`/`SHOW RING` and the admin listener's status
//! page (`/`) report, computed once here from the running clusters.

mod html;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

pub use html::render;

use crate::admin::http::{role_label, AdminState};
use crate::config::PoolMode;
use crate::cql::CqlCluster;
use crate::postgres::activity::now_micros;
use crate::postgres::cluster::Cluster;

/// One node of a cluster as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// `primary`, `read-only-primary`, `replica`, `stale-primary`, `unknown`, or `ring-member`
    /// (CQL).
    pub role: &'static str,
    pub healthy: bool,
    /// WAL bytes the replica is behind the primary (0 on the primary; unknown without both
    /// positions).
    pub lag_bytes: Option<u64>,
    /// How far the replica's replay is behind in time, in milliseconds (replicas only).
    pub lag_ms: Option<u64>,
    /// The node's WAL position (`0/3000060`).
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
    pub zone: Option<String>,
    /// Requests in flight on the node.
    pub in_flight: u64,
    /// PostgreSQL: idle pooled connections; CQL: open connections.
    pub connections: usize,
    /// Why the node is unhealthy.
    pub error: Option<String>,
}

/// One (database, user) pool of a PostgreSQL cluster, over all its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRow {
    pub database: String,
    pub user: String,
    /// Clients not waiting for a backend.
    pub clients_active: u64,
    /// Clients waiting for a backend (or for RESUME).
    pub clients_waiting: u64,
    /// How long the oldest waiting client has waited, in microseconds.
    pub max_wait_us: u64,
    /// Server connections with a client.
    pub servers_active: usize,
    /// Server connections in the pool.
    pub servers_idle: usize,
    /// Server connections being opened.
    pub servers_login: usize,
}

/// One node of a CQL ring.
#[derive(Debug, Clone, PartialEq)]
pub struct RingRow {
    pub address: String,
    pub datacenter: String,
    pub rack: String,
    pub up: bool,
    pub tokens: usize,
    /// Share of the whole token range (0..=1).
    pub ownership: f64,
}

/// Everything the status page shows about one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub name: String,
    /// `postgres` or `cql`.
    pub protocol: &'static str,
    pub listen: String,
    /// `transaction` or `session` (PostgreSQL only).
    pub pool_mode: Option<&'static str>,
    /// Connected clients.
    pub clients: usize,
    /// The discovery source's error while it is failing.
    pub discovery_error: Option<String>,
    pub nodes: Vec<NodeRow>,
    pub pools: Vec<PoolRow>,
    pub ring: Vec<RingRow>,
}

/// How PostgreSQL writes an LSN.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The name of a pool mode in the configuration.
pub fn pool_mode(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

/// The nodes of a PostgreSQL cluster with their roles and replication lag.
pub fn pg_nodes(c: &Cluster) -> Vec<NodeRow> {
    let snap = c.topology.load();
    let idle = c.pools.idle_counts();
    let primary_lsn = snap.primary().and_then(|i| snap.nodes[i].lsn);
    snap.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let role = role_label(&snap, i);
            let lag_bytes = match (role, primary_lsn, n.lsn) {
                ("replica", Some(p), Some(r)) => Some(p.saturating_sub(r)),
                ("primary", Some(_), _) => Some(0),
                _ => None,
            };
            NodeRow {
                id: n.id.clone(),
                address: n.address.clone(),
                role,
                healthy: n.health.up,
                lag_bytes,
                lag_ms: if role == "replica" { n.replay_lag_ms } else { None },
                lsn: n.lsn.map(lsn_text),
                timeline: n.timeline,
                zone: n.zone.clone(),
                in_flight: u64::from(n.load.get()),
                connections: idle.get(&n.address).copied().unwrap_or(0),
                error: n.health.error.clone(),
            }
        })
        .collect()
}

/// The nodes of a CQL cluster.
pub fn cql_nodes(c: &CqlCluster) -> Vec<NodeRow> {
    let snap = c.snapshot();
    snap.nodes
        .iter()
        .map(|n| NodeRow {
            id: n.pod.clone().unwrap_or_else(|| n.addr.to_string()),
            address: n.addr.to_string(),
            role: "ring-member",
            healthy: n.health.up,
            lag_bytes: None,
            lag_ms: None,
            lsn: None,
            timeline: None,
            zone: n.zone.clone(),
            in_flight: c.pools.inflight(n.addr) as u64,
            connections: c.pools.open_connections(n.addr),
            error: n.health.error.clone(),
        })
        .collect()
}

/// The pools of a PostgreSQL cluster by (database, user), with the clients that use them.
pub fn pg_pools(c: &Cluster) -> Vec<PoolRow> {
    let now = now_micros();
    fn row<'a>(
        rows: &'a mut BTreeMap<(String, String), PoolRow>,
        database: &str,
        user: &str,
    ) -> &'a mut PoolRow {
        rows.entry((database.to_string(), user.to_string()))
            .or_insert_with(|| PoolRow {
                database: database.to_string(),
                user: user.to_string(),
                ..PoolRow::default()
            })
    }
    let mut rows = BTreeMap::new();
    for cl in c.activity.clients() {
        let r = row(&mut rows, cl.database(), cl.user());
        let since = cl.wait_since.load(Ordering::Relaxed);
        if since == 0 {
            r.clients_active += 1;
        } else {
            r.clients_waiting += 1;
            r.max_wait_us = r.max_wait_us.max(now.saturating_sub(since));
        }
    }
    for p in c.pools.stats() {
        let r = row(&mut rows, &p.database, &p.user);
        r.servers_active += p.active;
        r.servers_idle += p.idle;
        r.servers_login += p.connecting;
    }
    rows.into_values().collect()
}

/// The nodes of a CQL ring with the share of the token range each owns.
pub fn cql_ring(c: &CqlCluster) -> Vec<RingRow> {
    let snap = c.snapshot();
    let owned = ownership(snap.nodes.iter().map(|n| n.tokens.as_slice()));
    snap.nodes
        .iter()
        .zip(owned)
        .map(|(n, share)| RingRow {
            address: n.addr.to_string(),
            datacenter: n.datacenter.clone(),
            rack: n.rack.clone(),
            up: n.health.up,
            tokens: n.tokens.len(),
            ownership: share,
        })
        .collect()
}

/// Every cluster of the running configuration, PostgreSQL first, in configuration order.
pub fn overview(state: &AdminState) -> Vec<ClusterView> {
    let statuses = state.discovery.load();
    let mut out: Vec<ClusterView> = state
        .clusters
        .load()
        .iter()
        .map(|c| ClusterView {
            name: c.config.name.clone(),
            protocol: "postgres",
            listen: c.config.listen.to_string(),
            pool_mode: Some(pool_mode(c.pg.pool_mode)),
            clients: c.clients.load(Ordering::Relaxed),
            discovery_error: statuses
                .get(&c.config.name)
                .and_then(|s| s.failing())
                .map(|(e, _)| e),
            nodes: pg_nodes(c),
            pools: pg_pools(c),
            ring: Vec::new(),
        })
        .collect();
    out.extend(state.cql.load().iter().map(|c| ClusterView {
        name: c.config.name.clone(),
        protocol: "cql",
        listen: c.config.listen.to_string(),
        pool_mode: None,
        clients: c.clients.load(Ordering::Relaxed),
        discovery_error: None,
        nodes: cql_nodes(c),
        pools: Vec::new(),
        ring: cql_ring(c),
    }));
    out
}

/// The share of the whole Murmur3 token range each node owns, given each node's tokens (each
/// token owns the range from the previous token, exclusive, to itself).
pub fn ownership<'a>(nodes: impl Iterator<Item = &'a [i64]>) -> Vec<f64> {
    let per_node: Vec<&[i64]> = nodes.collect();
    let mut all: Vec<(i64, usize)> = per_node
        .iter()
        .enumerate()
        .flat_map(|(i, ts)| ts.iter().map(move |t| (*t, i)))
        .collect();
    all.sort_unstable();
    let mut share = vec![0.0; per_node.len()];
    if all.is_empty() {
        return share;
    }
    let whole = 2f64.powi(64);
    for (k, (token, node)) in all.iter().enumerate() {
        let prev = if k == 0 {
            all[all.len() - 1].0
        } else {
            all[k - 1].0
        };
        // Wrapping: the first token owns the range from the last token around the ring.
        let width = token.wrapping_sub(prev) as u64;
        let width = if width == 0 && all.len() == 1 {
            whole
        } else {
            width as f64
        };
        share[*node] += width / whole;
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_splits_the_ring() {
        let a = [0i64];
        let b = [i64::MIN];
        let shares = ownership([&a[..], &b[..]].into_iter());
        assert!(
            (shares[0] - 0.5).abs() < 1e-9 && (shares[1] - 0.5).abs() < 1e-9,
            "{shares:?}"
        );
        let one = ownership([&a[..]].into_iter());
        assert!((one[0] - 1.0).abs() < 1e-9);
        assert_eq!(ownership([&[][..]].into_iter()), vec![0.0]);
    }

    #[test]
    fn lsn_is_written_as_postgres_does() {
        assert_eq!(lsn_text(0x1_0000_0060), "1/60");
    }
}
