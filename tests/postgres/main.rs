//! End-to-end tests of the PostgreSQL side of sluice: the real binary in front of a real
//! primary and streaming replicas.

#[path = "../support/mod.rs"]
mod support;

mod abuse;
mod admin;
mod auth;
mod auth_query;
mod bad_input;
mod consistency;
mod console;
mod differential;
mod failover;
mod faults;
mod pgbench;
mod pool;
mod protocol;
mod psql;
mod raw;
mod routing;
mod session_state;
mod status_page;
mod tls;
mod transparency;
mod write_hold;

use support::{simple_rows, PgCluster, Sluice};
use tokio_postgres::Client;

/// A cluster and a sluice in front of it. Fields drop in order: sluice stops first.
pub struct Env {
    pub sluice: Sluice,
    pub cluster: PgCluster,
}

impl Env {
    /// `replicas` replicas behind a sluice configured with `extra` in its `[[clusters]]`
    /// table and the `app` user.
    pub fn start(replicas: usize, extra: &str) -> Env {
        Env::start_with(replicas, extra, "")
    }

    /// Like [`Env::start`], appending `tail` (e.g. more `[[clusters.users]]`) to the config.
    pub fn start_with(replicas: usize, extra: &str, tail: &str) -> Env {
        let cluster = PgCluster::start(replicas);
        let (mut toml, _, _) = support::sluice_config(&cluster, extra);
        toml.push_str(tail);
        let sluice = Sluice::start(&toml);
        wait_all_probed(&sluice, cluster.node_ports().len());
        Env { sluice, cluster }
    }

    /// A client connected through sluice as `app` to database `app`.
    pub async fn app_client(&self) -> Client {
        support::connect(self.sluice.listen_addr(), "app", "app-secret", "app").await
    }
}

/// Waits (10 s at most) until /topology shows `nodes` healthy nodes: /readyz only needs one,
/// and a test that expects reads on a replica must not start before its first probe.
pub fn wait_all_probed(sluice: &Sluice, nodes: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, body) = sluice.http_get("/topology");
        // Nodes probed up with their role known (counting `"healthy":true` in the text also
        // counted the discovery source's own `healthy`, and returned with a node unprobed).
        let topology: serde_json::Value = serde_json::from_str(&body).expect("topology JSON");
        let probed = topology["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["nodes"].as_array().into_iter().flatten())
            .filter(|n| n["healthy"] == true && n["role"] != "unknown")
            .count();
        if probed >= nodes {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nodes not all healthy: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Where a query ran, asked with the simple protocol: (in recovery, server port).
pub async fn where_simple(client: &Client, prefix: &str) -> (bool, u16) {
    let sql = format!("{prefix}SELECT pg_is_in_recovery(), inet_server_port()");
    let rows = simple_rows(client, &sql).await;
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    (rows[0][0] == "t", rows[0][1].parse().expect("port"))
}

/// Where a query ran, asked with the extended protocol (a named prepared statement).
pub async fn where_extended(client: &Client) -> (bool, u16) {
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await
        .unwrap_or_else(|e| panic!("extended read failed: {}", support::describe(&e)));
    (row.get(0), u16::try_from(row.get::<_, i32>(1)).unwrap())
}
