//! Checks the test harness itself: a primary with two streaming replicas, and its roles.

mod support;

use support::{bounded, connect, simple_column, PgCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_with_two_replicas_replicates() {
    let cluster = PgCluster::start(2);
    bounded(60, async {
        assert_eq!(cluster.replica_ports().len(), 2);
        let primary = cluster.superuser_client(cluster.primary_port()).await;
        let in_recovery: bool = primary
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!in_recovery, "the primary must not be in recovery");
        primary
            .batch_execute("CREATE TABLE h (id int); INSERT INTO h VALUES (1), (2), (3)")
            .await
            .unwrap();
        cluster.wait_replicated().await;

        for port in cluster.replica_ports() {
            let replica = cluster.superuser_client(port).await;
            let row = replica
                .query_one("SELECT pg_is_in_recovery(), count(*) FROM h", &[])
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0), "port {port} must be a standby");
            assert_eq!(row.get::<_, i64>(1), 3, "rows replicated to {port}");
            let err = replica
                .batch_execute("INSERT INTO h VALUES (4)")
                .await
                .expect_err("a standby refuses writes");
            assert_eq!(err.code().map(|c| c.code()), Some("25006"));
        }

        // The roles the proxy tests rely on authenticate straight to the primary.
        let addr = ([127, 0, 0, 1], cluster.primary_port()).into();
        let app = connect(addr, "app", "app-secret", "app").await;
        assert_eq!(simple_column(&app, "SELECT current_user").await, ["app"]);
        let legacy = connect(addr, "legacy", "legacy-secret", "app").await;
        assert_eq!(
            simple_column(&legacy, "CREATE TABLE l (x int); SELECT current_user").await,
            ["legacy"]
        );
        let Err(err) = support::try_connect(addr, "app", "nope", "app").await else {
            panic!("wrong password was accepted");
        };
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
    })
    .await;
}
