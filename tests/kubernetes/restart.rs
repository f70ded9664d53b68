//! A pod that restarts with a new IP stays the same node: the Cassandra StatefulSet recording
//! (cass-1 deleted and recreated at 10.244.2.32), with PostgreSQL nodes behind the pods.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_apiserver::Scenario;

use crate::support::{bounded, exec, PgCluster};
use crate::{blocking, read_port, wait_for_node, write_port, K8sEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_restart_with_a_new_ip_keeps_routing() {
    let cluster = blocking(|| PgCluster::start(2));
    let ports = cluster.node_ports();
    let ip = |n| Ipv4Addr::new(127, 0, 0, n);
    // cass-0 fronts the primary; cass-1 (old and new IP) and cass-3 the first replica;
    // cass-2 the second.
    let pods = [
        ("10.244.1.31", ip(8), ports[0]),
        ("10.244.2.31", ip(9), ports[1]),
        ("10.244.3.31", ip(10), ports[2]),
        ("10.244.1.32", ip(11), ports[1]),
        ("10.244.2.32", ip(12), ports[1]),
    ];
    let mut env = K8sEnv::start(Scenario::cassandra_ring(), &pods, 9042, cluster).await;
    let toml = crate::pg_config(
        r#"probe_interval = "500ms""#,
        r#"[clusters.discovery.kubernetes]
namespace = "db"
service = "cass"
port = "cql""#,
    );
    env.start_sluice(&toml);
    bounded(120, async {
        let client = env.client().await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        env.cluster.wait_replicated().await;
        let old = wait_for_node(
            env.sluice(),
            &env.pod_addr(ip(9)),
            "replica",
            Duration::from_secs(5),
        );
        assert_eq!(old["id"], "cass-1");
        // Scale to 4, then delete cass-1: traffic keeps flowing at every step.
        for rv in [403, 408, 414, 417, 424] {
            env.fake.advance_to(rv);
            assert_eq!(write_port(&client).await, ports[0], "write at RV {rv}");
            read_port(&client).await;
        }
        // cass-1 is back, ready, with its new IP.
        env.fake.advance_to(426);
        let back = wait_for_node(
            env.sluice(),
            &env.pod_addr(ip(12)),
            "replica",
            Duration::from_secs(5),
        );
        assert_eq!(back["id"], "cass-1", "the same node, at its new address");
        env.fake.advance_all();
        // Scaled back to 3: the replicas are cass-1 (new IP) and cass-2; reads reach both.
        let want: HashSet<String> = [ip(8), ip(10), ip(12)].iter().map(|i| env.pod_addr(*i)).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (nodes, topo) = env.sluice().topology_nodes();
            let addrs: HashSet<String> = nodes
                .iter()
                .map(|n| n["address"].as_str().unwrap().to_string())
                .collect();
            if addrs == want {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{topo}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for_node(
            env.sluice(),
            &env.pod_addr(ip(12)),
            "replica",
            Duration::from_secs(5),
        );
        let mut seen = HashSet::new();
        for _ in 0..20 {
            seen.insert(read_port(&client).await);
            if seen.len() == 2 {
                break;
            }
        }
        assert_eq!(
            seen,
            HashSet::from([ports[1], ports[2]]),
            "reads reach both replicas"
        );
    })
    .await;
    env.sluice().assert_no_unexpected_errors(&[]);
}
