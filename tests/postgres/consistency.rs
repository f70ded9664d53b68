//! Consistency modes: read-your-writes with a replica whose replay is paused, max_replica_lag,
//! and multi-active clusters.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{bounded, exec, simple_column, simple_rows, PgCluster, Sluice};
use crate::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_never_reads_stale_data() {
    let env = Env::start(
        2,
        "consistency = \"read-your-writes\"\nprobe_interval = \"100ms\"",
    );
    bounded(90, async {
        let c = env.app_client().await;
        exec(&c, "CREATE TABLE ryw (id int PRIMARY KEY)").await;
        env.cluster.wait_replicated().await;
        let replicas = env.cluster.replica_ports();
        let (paused, live) = (replicas[0], replicas[1]);
        let p = env.cluster.superuser_client(paused).await;
        exec(&p, "SELECT pg_wal_replay_pause()").await;

        let mut ports: HashMap<u16, usize> = HashMap::new();
        for i in 0..30 {
            // Half of the writes with asynchronous commit: the commit record may still be in
            // the WAL buffers when the write is acknowledged.
            if i == 15 {
                exec(&c, "SET synchronous_commit = off").await;
            }
            exec(&c, &format!("INSERT INTO ryw VALUES ({i})")).await;
            // Immediately, and again once the probes have seen the live replica catch up.
            for _ in 0..2 {
                let rows = simple_rows(
                    &c,
                    &format!("SELECT count(*), inet_server_port() FROM ryw WHERE id = {i}"),
                )
                .await;
                assert_eq!(
                    rows[0][0], "1",
                    "read {i} after its write saw stale data on port {}",
                    rows[0][1]
                );
                *ports.entry(rows[0][1].parse().unwrap()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        eprintln!(
            "reads by port: {ports:?} (primary {}, paused {paused}, live {live})",
            env.cluster.primary_port()
        );
        assert!(
            !ports.contains_key(&paused),
            "the paused replica served a read-after-write"
        );
        assert!(
            ports.get(&live).copied().unwrap_or(0) > 0,
            "the caught-up replica was never used"
        );

        // Another client that never wrote may read anywhere, including the paused replica.
        let other = env.app_client().await;
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(simple_column(&other, "SELECT inet_server_port()").await[0].clone());
        }
        assert!(
            seen.iter().any(|p| *p != env.cluster.primary_port().to_string()),
            "{seen:?}"
        );
        exec(&p, "SELECT pg_wal_replay_resume()").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_replica_lag_excludes_a_lagging_replica_until_it_catches_up() {
    let env = Env::start(1, "max_replica_lag = \"64kB\"\nprobe_interval = \"100ms\"");
    bounded(90, async {
        let c = env.app_client().await;
        let replica = env.cluster.replica_ports()[0].to_string();
        let primary = env.cluster.primary_port().to_string();
        assert_eq!(
            simple_column(&c, "SELECT inet_server_port()").await,
            std::slice::from_ref(&replica)
        );
        let r = env.cluster.superuser_client(env.cluster.replica_ports()[0]).await;
        exec(&r, "SELECT pg_wal_replay_pause()").await;
        exec(
            &c,
            "CREATE TABLE lag AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..5 {
            assert_eq!(
                simple_column(&c, "SELECT inet_server_port()").await,
                std::slice::from_ref(&primary),
                "lagging replica used"
            );
        }
        exec(&r, "SELECT pg_wal_replay_resume()").await;
        env.cluster.wait_replicated().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(simple_column(&c, "SELECT inet_server_port()").await, [replica]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_active_sends_writes_to_every_node() {
    // Two independent primaries stand in for the nodes of a multi-active database.
    let a = PgCluster::start(0);
    let b = PgCluster::start(0);
    let (toml, _, _) = crate::support::sluice_config(&a, "topology = \"multi-active\"");
    let toml = toml.replace(
        &format!("static = [\"127.0.0.1:{}\"]", a.primary_port()),
        &format!(
            "static = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            a.primary_port(),
            b.primary_port()
        ),
    );
    let sluice = Sluice::start(&toml);
    bounded(60, async {
        let mut ports = HashMap::new();
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(crate::support::connect(sluice.listen_addr(), "app", "app-secret", "app").await);
        }
        for round in 0..5 {
            let writes = clients.iter().enumerate().map(|(i, c)| async move {
                simple_column(
                    c,
                    &format!("CREATE TABLE IF NOT EXISTS t{round}_{i} (x int); SELECT inet_server_port()"),
                )
                .await
            });
            for port in futures_util::future::join_all(writes).await {
                *ports.entry(port[0].clone()).or_insert(0) += 1;
            }
        }
        eprintln!("writes by port: {ports:?}");
        assert_eq!(ports.len(), 2, "writes should use both nodes: {ports:?}");
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}
