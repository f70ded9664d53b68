//! Read/write routing: reads to replicas, writes and transactions to the primary.

use std::collections::HashSet;
use std::sync::Arc;

use crate::support::{bounded, describe, exec, simple_column, simple_rows};
use crate::{where_extended, where_simple, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_a_replica_and_writes_to_the_primary() {
    let env = Env::start(1, "");
    let primary = env.cluster.primary_port();
    let replica = env.cluster.replica_ports()[0];
    bounded(60, async {
        let client = env.app_client().await;

        assert_eq!(where_simple(&client, "").await, (true, replica), "simple read");
        assert_eq!(where_extended(&client).await, (true, replica), "extended read");

        // One named statement, prepared once and executed many times: it must keep working
        // whichever pooled backend each execution lands on.
        let stmt = client
            .prepare("SELECT pg_is_in_recovery(), inet_server_port(), $1::int + 1")
            .await
            .expect("prepare");
        for i in 0..10i32 {
            let row = client
                .query_one(&stmt, &[&i])
                .await
                .unwrap_or_else(|e| panic!("execution {i} of a prepared statement: {}", describe(&e)));
            assert!(row.get::<_, bool>(0), "prepared read {i} ran on the primary");
            assert_eq!(row.get::<_, i32>(2), i + 1);
        }

        // Writes fail on a standby, so their success proves they reached the primary.
        exec(&client, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
        exec(&client, "INSERT INTO t VALUES (1, 'one')").await;
        client
            .execute("INSERT INTO t VALUES ($1, $2)", &[&2i32, &"two"])
            .await
            .unwrap_or_else(|e| panic!("extended INSERT: {}", describe(&e)));
        let direct = env.cluster.superuser_client(primary).await;
        let count: i64 = direct
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, 2, "rows written through sluice are on the primary");

        // Explicit transactions stay on the primary from BEGIN to COMMIT.
        exec(&client, "BEGIN").await;
        assert_eq!(where_simple(&client, "").await, (false, primary), "in BEGIN");
        assert_eq!(where_extended(&client).await, (false, primary), "in BEGIN");
        exec(&client, "COMMIT").await;
        {
            let mut client = env.app_client().await;
            let tx = client.transaction().await.expect("BEGIN");
            let row = tx.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap();
            assert!(!row.get::<_, bool>(0), "transaction() read ran on a replica");
            tx.commit().await.expect("COMMIT");
        }

        // ...unless they are read-only.
        exec(&client, "BEGIN READ ONLY").await;
        assert_eq!(
            where_simple(&client, "").await,
            (true, replica),
            "BEGIN READ ONLY"
        );
        exec(&client, "COMMIT").await;

        // A hint forces the primary.
        assert_eq!(
            where_simple(&client, "/* sluice: primary */ ").await,
            (false, primary),
            "hinted read"
        );

        // Reads with side effects or locks need the primary.
        exec(&client, "CREATE SEQUENCE s").await;
        assert_eq!(simple_column(&client, "SELECT nextval('s')").await, ["1"]);
        let next: i64 = client
            .query_one("SELECT nextval('s')", &[])
            .await
            .unwrap_or_else(|e| panic!("extended nextval: {}", describe(&e)))
            .get(0);
        assert_eq!(next, 2);
        assert_eq!(
            simple_column(&client, "SELECT id FROM t WHERE id = 1 FOR UPDATE").await,
            ["1"]
        );
        assert_eq!(
            simple_column(
                &client,
                "WITH x AS (INSERT INTO t VALUES (3, 'three') RETURNING id) SELECT id FROM x"
            )
            .await,
            ["3"]
        );

        // Once replicated, a plain read of the table is served by the replica.
        env.cluster.wait_replicated().await;
        let rows = client
            .query("SELECT id, inet_server_port() FROM t ORDER BY id", &[])
            .await
            .unwrap_or_else(|e| panic!("read of t: {}", describe(&e)));
        let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(rows[0].get::<_, i32>(1), i32::from(replica));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_use_every_replica() {
    let env = Env::start(2, "");
    let replicas: HashSet<u16> = env.cluster.replica_ports().into_iter().collect();
    bounded(60, async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(Arc::new(env.app_client().await));
        }
        let mut seen = HashSet::new();
        for round in 0..5 {
            // Overlapping reads: "fewest active queries" must send them to both replicas.
            let reads: Vec<_> = clients
                .iter()
                .map(|c| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let sql = "SELECT pg_is_in_recovery(), inet_server_port() \
                                   FROM pg_sleep(0.1)";
                        let rows = simple_rows(&c, sql).await;
                        (rows[0][0] == "t", rows[0][1].parse::<u16>().unwrap())
                    })
                })
                .collect();
            for read in reads {
                let (in_recovery, port) = read.await.expect("read task");
                assert!(in_recovery, "round {round}: a read ran on the primary");
                assert!(replicas.contains(&port), "round {round}: read on {port}");
                seen.insert(port);
            }
        }
        assert_eq!(seen, replicas, "20 concurrent reads did not use both replicas");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_primary_sends_reads_to_the_primary() {
    let env = Env::start(1, r#"consistency = "primary""#);
    let primary = env.cluster.primary_port();
    bounded(60, async {
        let client = env.app_client().await;
        for _ in 0..3 {
            assert_eq!(where_simple(&client, "").await, (false, primary), "simple");
            assert_eq!(where_extended(&client).await, (false, primary), "extended");
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Functions that write — built-in ones the classifier's list does not name, and user-defined
/// ones created directly on the server — route as writes; read-safe ones stay on replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_learnt_from_pg_proc_are_writes() {
    let env = Env::start(1, "");
    let primary = env.cluster.primary_port();
    let su = bounded(30, env.cluster.superuser_client(primary)).await;
    bounded(30, async {
        exec(&su, "CREATE TABLE vol_log (v int)").await;
        exec(&su, "GRANT ALL ON vol_log TO app").await;
        exec(&su, "CREATE FUNCTION log_it(x int) RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO vol_log VALUES (x) RETURNING x'").await;
        exec(&su, "CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 2 * x'").await;
        exec(&su, "CREATE TABLE brin_t (a int); CREATE INDEX brin_i ON brin_t USING brin (a)").await;
        exec(&su, "ALTER TABLE brin_t OWNER TO app").await;
        env.cluster.wait_replicated().await;
    })
    .await;
    bounded(60, async {
        let client = env.app_client().await;
        for sql in [
            "SELECT log_it(7)",
            "SELECT lo_from_bytea(0, 'x')",
            "SELECT brin_summarize_new_values('brin_i')",
        ] {
            let r = client.simple_query(sql).await;
            assert!(r.is_ok(), "{sql}: {:?}", r.err().map(|e| describe(&e)));
        }
        assert_eq!(
            simple_column(&client, "SELECT count(*) FROM vol_log /* sluice: primary */").await,
            ["1"]
        );
        // Read-safe calls still go to the replica.
        for sql in [
            "SELECT twice(2), random(), lower('X'), now(), pg_is_in_recovery()::text",
            "SELECT * FROM (SELECT 1) x, LATERAL (SELECT pg_is_in_recovery()::text r) y",
        ] {
            let rows = simple_rows(&client, sql).await;
            assert_eq!(
                rows[0].last().map(String::as_str),
                Some("true"),
                "{sql}: {rows:?}"
            );
        }
        // A function created a moment ago through sluice is unknown: a write until learnt.
        exec(
            &client,
            "CREATE FUNCTION fresh_fn() RETURNS boolean LANGUAGE sql STABLE AS 'SELECT pg_is_in_recovery()'",
        )
        .await;
        assert_eq!(
            simple_column(&client, "SELECT fresh_fn()").await,
            ["f"],
            "new function: primary"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
