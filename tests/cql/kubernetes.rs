//! CQL nodes discovered from Kubernetes: the fake API server replays the Cassandra StatefulSet
//! recording (cass-0/1/2 in zone-a/b/c), its pod IPs rewritten to the test cluster's nodes
//! (127.0.0.1..3). The pods are the seeds, each ring node is shown with its pod, replicas in
//! the client's zone (`zone = "zone-b"`, cass-1) are preferred, and a pod restart (cass-1
//! deleted and recreated) keeps routing.

use std::time::{Duration, Instant};

use k8s_apiserver::{FakeApiServer, Scenario, ADMIN_TOKEN};
use sluice_cql::response::ResultBody;
use sluice_cql::{Compression, Response};
use sluice_cql_testcluster::{ClusterSpec, Record, TestCluster};

use crate::client::{int, text, Client};
use crate::support::{bounded, free_port, Sluice};
use crate::{replica_hits, user_records};

/// The node of cass-1, the pod in the client's zone.
const ZONE_B: usize = 1;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `/topology`'s nodes as (address, pod, zone, healthy).
fn nodes(sluice: &Sluice) -> Vec<(String, Option<String>, Option<String>, bool)> {
    let (status, body) = sluice.http_get("/topology");
    assert_eq!(status, 200, "{body}");
    let topo: serde_json::Value = serde_json::from_str(&body).expect("topology JSON");
    let cluster = topo["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["protocol"] == "cql")
        .unwrap_or_else(|| panic!("no CQL cluster in {body}"));
    let mut out: Vec<_> = cluster["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|n| {
            (
                n["address"].as_str().unwrap_or_default().to_string(),
                n["id"].as_str().map(str::to_string),
                n["zone"].as_str().map(str::to_string),
                n["healthy"] == true,
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits until `/topology` shows exactly `want` (address, pod, zone, healthy).
fn wait_for_nodes(sluice: &Sluice, want: &[(String, Option<String>, Option<String>, bool)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = nodes(sluice);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "want {want:?}, /topology has {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes and reads `n` keys through sluice with prepared statements.
async fn workload(c: &mut Client, from: i32, n: i32) {
    let ins = c.prepare("INSERT INTO kv (k, v) VALUES (?, ?)").await;
    let sel = c.prepare("SELECT v FROM kv WHERE k = ?").await;
    for i in from..from + n {
        let k = format!("key{i}");
        let r = c.execute(&ins, vec![text(&k), int(i)]).await;
        assert!(matches!(r, Response::Result(ResultBody::Void)), "{r:?}");
        match c.execute(&sel, vec![text(&k)]).await {
            Response::Result(ResultBody::Rows(rows)) => {
                assert_eq!(rows.rows().unwrap(), vec![vec![Some(int(i))]])
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Requests with a token (answered; an UNPREPARED after a restart is retried) are all
/// coordinated by a replica; and every one whose replicas include an up node of zone-b went
/// to it. Returns how many went to zone-b.
fn check_routing(records: &[Record], zone_b_up: bool) -> usize {
    let routed: Vec<&Record> = records
        .iter()
        .filter(|r| r.token.is_some() && r.error.is_none())
        .collect();
    assert!(routed.len() >= 20, "{} routed requests", routed.len());
    let (hits, routable) = replica_hits(routed.iter().copied());
    assert_eq!(hits, routable, "every routable request coordinated by a replica");
    let mut in_zone = 0;
    for r in &routed {
        if zone_b_up && r.replicas.contains(&ZONE_B) {
            assert_eq!(
                r.node, ZONE_B,
                "a replica in the client's zone is preferred: {r:?}"
            );
            in_zone += 1;
        } else {
            assert_ne!(r.node, ZONE_B, "{r:?}");
        }
    }
    in_zone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_the_ring_nodes_and_the_clients_zone_is_preferred() {
    let cluster = blocking(|| TestCluster::start(ClusterSpec::new(3, 8))).expect("test cluster");
    let port = cluster.port();
    // cass-0/1/2 are the three nodes; cass-1 comes back at its old node (a node keeps its
    // address in the test cluster); cass-3 (scaled up, then down) has no node behind it.
    let mut scenario = Scenario::cassandra_ring().rewrite("\"port\":9042", &format!("\"port\":{port}"));
    for (recorded, loopback) in [
        ("10.244.1.31", "127.0.0.1"),
        ("10.244.2.31", "127.0.0.2"),
        ("10.244.3.31", "127.0.0.3"),
        ("10.244.2.32", "127.0.0.2"),
        ("10.244.1.32", "127.0.0.4"),
    ] {
        scenario = scenario.rewrite(&format!("\"{recorded}\""), &format!("\"{loopback}\""));
    }
    let fake = FakeApiServer::start(scenario).await.expect("fake API server");
    let dir = tempfile::Builder::new()
        .prefix("sluice-kube-")
        .tempdir()
        .expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    std::fs::write(&kubeconfig, fake.kubeconfig(ADMIN_TOKEN)).expect("write kubeconfig");
    // The contract's shape (kubernetes.toml), with protocol = "cql" and the client's zone.
    let toml = format!(
        r#"
[admin]
listen = "127.0.0.1:{}"

[[clusters]]
name = "ring"
protocol = "cql"
listen = "127.0.0.1:{}"
zone = "zone-b"
probe_interval = "200ms"

[clusters.discovery.kubernetes]
namespace = "db"
service = "cass"
port = "cql"
"#,
        free_port(),
        free_port()
    );
    let kubeconfig = kubeconfig.display().to_string();
    let sluice = blocking(|| Sluice::start_with_env(&toml, &[("KUBECONFIG", &kubeconfig)]));
    let node = |i: usize, up: bool| {
        let zone = ["zone-a", "zone-b", "zone-c"][i];
        (
            cluster.address(i).to_string(),
            Some(format!("cass-{i}")),
            Some(zone.to_string()),
            up,
        )
    };
    bounded(90, async {
        // Each ring node (read from system.local/peers) is shown with its pod and zone.
        blocking(|| wait_for_nodes(&sluice, &[node(0, true), node(1, true), node(2, true)]));
        let mut c = Client::connect(sluice.listen_addr(), 4, Compression::None).await;
        c.ok("CREATE KEYSPACE kz WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}")
            .await;
        c.ok("USE kz").await;
        c.ok("CREATE TABLE kv (k text PRIMARY KEY, v int)").await;
        cluster.clear_records();
        workload(&mut c, 0, 30).await;
        let in_zone = check_routing(&user_records(&cluster, "kz"), true);
        assert!(in_zone > 0, "some keys have a replica in zone-b");

        // cass-1 is deleted (its node stops) and recreated: routing goes on meanwhile.
        fake.advance_to(408);
        blocking(|| cluster.kill(ZONE_B));
        fake.advance_to(417);
        cluster.clear_records();
        workload(&mut c, 100, 20).await;
        check_routing(&user_records(&cluster, "kz"), false);

        // cass-1 is back and ready: its node is up again, mapped to the pod, and preferred.
        blocking(|| cluster.restart(ZONE_B)).expect("restart");
        fake.advance_to(426);
        blocking(|| wait_for_nodes(&sluice, &[node(0, true), node(1, true), node(2, true)]));
        fake.advance_all();
        cluster.clear_records();
        workload(&mut c, 200, 30).await;
        let in_zone = check_routing(&user_records(&cluster, "kz"), true);
        assert!(in_zone > 0, "zone-b is preferred again after the restart");
        blocking(|| wait_for_nodes(&sluice, &[node(0, true), node(1, true), node(2, true)]));
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}
