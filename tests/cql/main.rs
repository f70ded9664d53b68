//! End-to-end tests of the CQL side of sluice: the real binary in front of the CQL test
//! cluster (`tests/cql-cluster`), which records which node coordinated every request and
//! whether it is a replica of the request's token.

#[path = "../support/mod.rs"]
mod support;

mod auth;
mod bad_input;
mod client;
mod console;
mod drivers;
mod failover;
mod health;
mod inflight;
mod kubernetes;
mod metrics;
mod reload;
mod routing;
mod tls;
mod topology;

use std::net::SocketAddr;

use sluice_cql_testcluster::{ClusterSpec, Record, TestCluster};
use support::{free_port, Sluice};

/// A test cluster and a sluice in front of it. Fields drop in order: sluice stops first.
pub struct Env {
    pub sluice: Sluice,
    pub cluster: TestCluster,
}

impl Env {
    /// `nodes` nodes with 8 tokens each behind sluice; `cluster_keys` go into `[[clusters]]`,
    /// `tail` after the discovery table (e.g. a `[clusters.cql]` table).
    pub fn start(nodes: usize, cluster_keys: &str, tail: &str) -> Env {
        Env::with_spec(ClusterSpec::new(nodes, 8), cluster_keys, tail)
    }

    pub fn with_spec(spec: ClusterSpec, cluster_keys: &str, tail: &str) -> Env {
        let cluster = TestCluster::start(spec).expect("test cluster starts");
        let sluice = Sluice::start(&config(&cluster, cluster_keys, tail));
        Env { sluice, cluster }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.sluice.listen_addr()
    }

    /// The node of the last "CQL control connection ready" line sluice logged (after `skip`
    /// lines), as `ip:port`.
    pub fn control_node(&self, skip: usize) -> Option<String> {
        self.sluice
            .logs()
            .iter()
            .skip(skip)
            .rev()
            .filter(|l| l.contains("CQL control connection ready"))
            .filter_map(|l| l.split(" node=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .next()
    }

    /// Waits (up to `within`) until the control connection is ready somewhere, and returns
    /// the index of its node in the test cluster.
    pub async fn control_index(&self, within: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(node) = self.control_node(0) {
                let addr: SocketAddr = node.parse().unwrap();
                return self.cluster.node_of(addr.ip()).expect("a cluster node");
            }
            assert!(std::time::Instant::now() < deadline, "no control connection");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A sluice configuration for `cluster` on fresh ports.
pub fn config(cluster: &TestCluster, cluster_keys: &str, tail: &str) -> String {
    let seeds = cluster.contact_points_toml();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[[clusters]]\nname = \"ring\"\nprotocol = \"cql\"\nlisten = \"127.0.0.1:{}\"\nprobe_interval = \"200ms\"\n{cluster_keys}\n\n[clusters.discovery]\nstatic = {seeds}\n{tail}\n",
        free_port(),
        free_port()
    )
}

/// (requests coordinated by a replica, requests with a token) among `records`.
pub fn replica_hits<'a>(records: impl IntoIterator<Item = &'a Record>) -> (usize, usize) {
    let mut hits = 0;
    let mut routable = 0;
    for r in records {
        if let Some(is) = r.coordinator_is_replica() {
            routable += 1;
            hits += usize::from(is);
        }
    }
    (hits, routable)
}

/// Records of user keyspaces only (drivers' own system queries have no token anyway).
pub fn user_records(cluster: &TestCluster, keyspace: &str) -> Vec<Record> {
    cluster
        .records()
        .into_iter()
        .filter(|r| r.keyspace.as_deref() == Some(keyspace))
        .collect()
}
