//! Recorded failovers move the writes: CloudNativePG (pg-1 → pg-2, through the contract file
//! unchanged) and Patroni (acid-pg-0 → acid-pg-1, a switchover).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_apiserver::Scenario;

use crate::support::{bounded, exec, PgCluster};
use crate::{blocking, contract_config, read_port, wait_for_node, write_port, K8sEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudnative_pg_failover_moves_writes_to_the_new_primary() {
    let cluster = blocking(|| PgCluster::start(2));
    let ports = cluster.node_ports();
    let (pg1, pg2, pg3) = (
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    );
    let pods = [
        ("10.244.1.11", pg1, ports[0]),
        ("10.244.2.11", pg2, ports[1]),
        ("10.244.3.11", pg3, ports[2]),
    ];
    let mut env = K8sEnv::start(Scenario::cnpg_failover(), &pods, 5432, cluster).await;
    let (toml, _, _) = contract_config();
    env.start_sluice(&toml);
    bounded(120, async {
        let client = env.client().await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        assert_eq!(write_port(&client).await, ports[0], "pg-1 is the primary");
        env.cluster.wait_replicated().await;
        assert_ne!(read_port(&client).await, ports[0], "reads go to a replica");
        let topo = wait_for_node(
            env.sluice(),
            &env.pod_addr(pg2),
            "replica",
            Duration::from_secs(5),
        );
        assert_eq!(topo["id"], "pg-2", "nodes are named after their pods");
        assert_eq!(topo["zone"], "zone-b");

        // pg-1 dies; the operator labels pg-2 primary before it is promoted (RV 249): the
        // label alone must not get it writes, and the disagreement is counted.
        blocking(|| env.cluster.stop_node(ports[0]));
        env.fake.advance_to(249);
        let series = format!(
            "sluice_role_disagreements_total{{cluster=\"pg\",node=\"{}\"}}",
            env.pod_addr(pg2)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.sluice().metric(&series).unwrap_or(0.0) < 1.0 {
            assert!(Instant::now() < deadline, "no disagreement counted for pg-2");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = Instant::now();
        blocking(|| env.cluster.promote(0));
        env.fake.advance_all();
        assert_eq!(
            write_port(&client).await,
            ports[1],
            "writes follow the promoted pg-2"
        );
        eprintln!("first write on pg-2 {:?} after the promotion", started.elapsed());
        let fresh = env.client().await;
        assert_eq!(write_port(&fresh).await, ports[1]);
        wait_for_node(
            env.sluice(),
            &env.pod_addr(pg2),
            "primary",
            Duration::from_secs(5),
        );
        assert_eq!(
            env.sluice().metric(&format!(
                "sluice_node_role_disagreement{{cluster=\"pg\",node=\"{}\"}}",
                env.pod_addr(pg2)
            )),
            Some(0.0)
        );
    })
    .await;
    let gone = env.pod_addr(pg1);
    env.sluice().assert_no_unexpected_errors(&[&gone]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_switchover_moves_writes_to_the_new_leader() {
    let cluster = blocking(|| PgCluster::start(2));
    let ports = cluster.node_ports();
    let (a0, a1, a2) = (
        Ipv4Addr::new(127, 0, 0, 5),
        Ipv4Addr::new(127, 0, 0, 6),
        Ipv4Addr::new(127, 0, 0, 7),
    );
    let pods = [
        ("10.244.1.21", a0, ports[0]),
        ("10.244.2.21", a1, ports[1]),
        ("10.244.3.21", a2, ports[2]),
    ];
    let mut env = K8sEnv::start(Scenario::patroni_switchover(), &pods, 5432, cluster).await;
    let toml = crate::pg_config(
        "",
        r#"[clusters.discovery.kubernetes]
namespace = "db"
service = ["acid-pg", "acid-pg-repl"]    # the leader's Service and the replicas'
port = "postgresql"
roles = "patroni""#,
    );
    env.start_sluice(&toml);
    bounded(120, async {
        let client = env.client().await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        assert_eq!(write_port(&client).await, ports[0], "acid-pg-0 leads");
        // Switchover: Patroni stops acid-pg-0 and promotes acid-pg-1.
        blocking(|| env.cluster.stop_node(ports[0]));
        env.fake.advance_to(330);
        blocking(|| env.cluster.promote(0));
        env.fake.advance_all();
        assert_eq!(write_port(&client).await, ports[1], "writes follow acid-pg-1");
        let leader = wait_for_node(env.sluice(), &env.pod_addr(a1), "primary", Duration::from_secs(5));
        assert_eq!(leader["id"], "acid-pg-1");
        assert_eq!(leader["labeled_role"], "primary");
        assert_ne!(read_port(&client).await, ports[0]);
    })
    .await;
    let gone = env.pod_addr(a0);
    env.sluice().assert_no_unexpected_errors(&[&gone]);
}
