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

/// Sets a CloudNativePG pod's role labels, as the operator does.
fn relabel(fake: &k8s_apiserver::FakeApiServer, pod: &str, role: &str) {
    let text = fake
        .object(k8s_apiserver::Kind::Pod, "db", pod)
        .unwrap_or_else(|| panic!("no pod {pod}"));
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("pod JSON");
    v["metadata"]["labels"]["cnpg.io/instanceRole"] = role.into();
    v["metadata"]["labels"]["role"] = role.into();
    fake.write(k8s_apiserver::EventType::Modified, &v.to_string());
}

/// `write_hold` with role labels: the operator relabels pg-2 primary and pg-1 replica before
/// anything changes in PostgreSQL. sluice holds new writes from that moment (the label names a
/// primary its probe has not confirmed), transactions in flight finish on pg-1, and the
/// switchover that follows (pg-1 stopped, pg-2 promoted) fails no transaction at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_write_hold_a_relabel_before_the_switchover_holds_writes_and_fails_none() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    const WRITERS: usize = 4;
    let cluster = blocking(|| PgCluster::start(2));
    let ports = cluster.node_ports();
    let (pg1, pg2, pg3) = (
        Ipv4Addr::new(127, 0, 0, 21),
        Ipv4Addr::new(127, 0, 0, 22),
        Ipv4Addr::new(127, 0, 0, 23),
    );
    let pods = [
        ("10.244.1.11", pg1, ports[0]),
        ("10.244.2.11", pg2, ports[1]),
        ("10.244.3.11", pg3, ports[2]),
    ];
    let mut env = K8sEnv::start(Scenario::cnpg_failover(), &pods, 5432, cluster).await;
    let toml = crate::pg_config(
        "write_hold = \"30s\"\nprobe_interval = \"200ms\"",
        r#"[clusters.discovery.kubernetes]
namespace = "db"
service = "pg-r"
port = "postgres"
roles = "cloudnative-pg""#,
    );
    env.start_sluice(&toml);
    let metric = |name: &str| format!("sluice_write_hold_{name}{{cluster=\"pg\"}}");
    bounded(120, async {
        let client = env.client().await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        assert_eq!(write_port(&client).await, ports[0], "pg-1 is the primary");
        wait_for_node(env.sluice(), &env.pod_addr(pg2), "replica", Duration::from_secs(5));
        let stop = Arc::new(AtomicBool::new(false));
        let committed: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::default()).collect();
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for n in &committed {
            let (c, stop, n, failures) = (env.client().await, stop.clone(), n.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let mut failed = None;
                    for sql in ["BEGIN", "INSERT INTO k DEFAULT VALUES", "COMMIT"] {
                        if let Err(e) = c.batch_execute(sql).await {
                            failed = Some(format!("{sql}: {}", crate::support::describe(&e)));
                            break;
                        }
                    }
                    match failed {
                        None => {
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(f) => {
                            failures.lock().unwrap().push(f);
                            if c.batch_execute("ROLLBACK").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        let counts = || committed.iter().map(|n| n.load(Ordering::SeqCst)).collect::<Vec<_>>();
        let deadline = Instant::now() + Duration::from_secs(30);
        while counts().iter().any(|&c| c < 3) {
            assert!(Instant::now() < deadline, "writers never got going: {:?}", counts());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // The operator's planned switchover starts with the labels.
        let relabelled = Instant::now();
        relabel(&env.fake, "pg-2", "primary");
        relabel(&env.fake, "pg-1", "replica");
        // Every writer ends up held (each waits in one held request; none is released while
        // the hold lasts).
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.sluice().metric(&metric("active")) != Some(1.0)
            || env.sluice().metric(&metric("requests_total")).unwrap_or(0.0) < WRITERS as f64
        {
            assert!(Instant::now() < deadline, "the writers were never all held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all_held = relabelled.elapsed();
        let before = counts();
        blocking(|| {
            env.cluster.stop_node(ports[0]);
            env.cluster.promote(0);
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.sluice().metric(&metric("active")) != Some(0.0) {
            assert!(Instant::now() < deadline, "the hold never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ended = relabelled.elapsed();
        let deadline = Instant::now() + Duration::from_secs(30);
        while counts().iter().zip(&before).any(|(now, then)| *now < then + 3) {
            assert!(Instant::now() < deadline, "writers did not resume: {:?}", counts());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        let failures = failures.lock().unwrap().clone();
        eprintln!(
            "[write_hold] relabel first: {WRITERS} writers all held {all_held:?} after the relabel, hold ended \
             {ended:?} after it, {} committed, {} failed",
            counts().iter().sum::<u64>(),
            failures.len()
        );
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(write_port(&client).await, ports[1], "writes go to pg-2");
    })
    .await;
    let gone = env.pod_addr(pg1);
    env.sluice().assert_no_unexpected_errors(&[&gone]);
}
