//! Failover: a replica is promoted and the old primary stops; writes follow without errors.

use std::time::{Duration, Instant};

use crate::support::{bounded, describe, exec, simple_column};
use crate::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_replica() {
    let env = Env::start(1, r#"probe_interval = "1s""#);
    let old_primary = env.cluster.primary_port();
    let new_primary = env.cluster.replica_ports()[0];
    bounded(90, async {
        let client = env.app_client().await;
        exec(&client, "CREATE TABLE f (id int)").await;
        exec(&client, "INSERT INTO f VALUES (1)").await;
        env.cluster.wait_replicated().await;

        env.cluster.promote(0);
        env.cluster.stop_node(old_primary);
        let started = Instant::now();

        // The first write after the failover must succeed: no retry allowed.
        if let Err(e) = client.execute("INSERT INTO f VALUES ($1)", &[&2i32]).await {
            panic!(
                "first write after failover failed after {:?}: {}",
                started.elapsed(),
                describe(&e)
            );
        }
        let took = started.elapsed();
        eprintln!("first write after failover succeeded after {took:?}");
        assert!(took < Duration::from_secs(2), "write took {took:?}");

        let fresh = env.app_client().await;
        exec(&fresh, "INSERT INTO f VALUES (3)").await;
        eprintln!(
            "write on a new connection done {:?} after failover",
            started.elapsed()
        );

        // The topology names the promoted node as primary.
        let want = format!("127.0.0.1:{new_primary}");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (nodes, body) = env.sluice.topology_nodes();
            let promoted = nodes.iter().find(|n| n["address"] == want.as_str());
            if promoted.is_some_and(|n| n["role"] == "primary") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/topology does not show {want} as primary: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Nothing was lost, and reads work against what is left.
        assert_eq!(simple_column(&client, "SELECT count(*) FROM f").await, ["3"]);
        let direct = env.cluster.superuser_client(new_primary).await;
        let ids: Vec<i32> = direct
            .query("SELECT id FROM f ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    })
    .await;
    // The stopped node is expected to show up in errors.
    let gone = format!("127.0.0.1:{old_primary}");
    env.sluice.assert_no_unexpected_errors(&[&gone]);
}
