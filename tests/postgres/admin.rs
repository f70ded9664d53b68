//! The admin listener: health, readiness, topology JSON and Prometheus metrics.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::{bounded, simple_column};
use crate::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_describe_the_cluster() {
    let env = Env::start(2, "");
    bounded(60, async {
        let client = env.app_client().await;
        for _ in 0..3 {
            assert_eq!(simple_column(&client, "SELECT 1").await, ["1"]);
        }
        client.query_one("SELECT 1", &[]).await.expect("extended");

        assert_eq!(env.sluice.http_get("/healthz").0, 200);
        assert_eq!(env.sluice.http_get("/readyz").0, 200);

        let want: HashSet<String> = env
            .cluster
            .node_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let primary = format!("127.0.0.1:{}", env.cluster.primary_port());
        // Roles come from probes; give them a few intervals to settle.
        let deadline = Instant::now() + Duration::from_secs(5);
        let nodes = loop {
            let (nodes, body) = env.sluice.topology_nodes();
            let settled = nodes.len() == want.len()
                && nodes
                    .iter()
                    .all(|n| n["healthy"] == true && (n["role"] == "primary" || n["role"] == "replica"));
            if settled {
                break nodes;
            }
            assert!(Instant::now() < deadline, "topology did not settle: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut seen = HashSet::new();
        for node in &nodes {
            let address = node["address"].as_str().expect("address").to_string();
            let role = if address == primary { "primary" } else { "replica" };
            assert_eq!(node["role"], role, "{node}");
            assert!(node.get("lsn").is_some(), "node without lsn: {node}");
            seen.insert(address);
        }
        assert_eq!(seen, want, "topology nodes");

        let (status, metrics) = env.sluice.http_get("/metrics");
        assert_eq!(status, 200);
        for name in ["sluice_queries_total", "sluice_probe"] {
            assert!(
                metrics
                    .lines()
                    .any(|l| !l.starts_with('#') && l.starts_with(name)),
                "/metrics has no {name} sample:\n{metrics}"
            );
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
