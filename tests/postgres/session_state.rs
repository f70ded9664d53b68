//! Session state under transaction pooling: settings follow the client to every backend,
//! state that cannot move (LISTEN, temp tables, session advisory locks) pins the client, and
//! named prepared statements work on whichever backend a request lands.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::{bounded, describe, exec, simple_column};
use crate::Env;

/// (value of `SHOW name`, backend pid) in one round trip.
async fn show(client: &tokio_postgres::Client, name: &str) -> (String, String) {
    let rows = crate::support::simple_rows(
        client,
        &format!("SELECT current_setting('{name}'), pg_backend_pid()::text"),
    )
    .await;
    (rows[0][0].clone(), rows[0][1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_the_client_to_every_backend() {
    // Everything on the primary, so both clients share one pool of backends.
    // Two backends: a client keeps its backend parked between transactions until another
    // client needs it, which is how the steps below move clients between backends.
    let env = Env::start(1, "consistency = \"primary\"\npool_size = 2");
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        let f = env.app_client().await;
        exec(&a, "SET statement_timeout = '4242ms'").await;
        let (_, pid_a) = show(&a, "statement_timeout").await;

        // F holds the second backend in a transaction; B then needs A's parked one and holds
        // it in a transaction too. When F finishes, A gets F's backend.
        exec(&f, "BEGIN").await;
        exec(&b, "BEGIN").await;
        let (b_value, pid_b) = show(&b, "statement_timeout").await;
        assert_eq!(pid_b, pid_a, "expected B to take A's parked backend");
        assert_eq!(b_value, "0", "A's setting leaked to B on a shared backend");
        exec(&f, "COMMIT").await;
        let (a_value, pid_a2) = show(&a, "statement_timeout").await;
        assert_ne!(
            pid_a2, pid_a,
            "A should be on another backend while B holds the first"
        );
        assert_eq!(
            a_value, "4242ms",
            "A's setting was not replayed on its new backend"
        );
        exec(&b, "COMMIT").await;

        // A SET rolled back with its transaction does not stick; RESET does.
        exec(&a, "BEGIN; SET statement_timeout = '7s'; ROLLBACK").await;
        assert_eq!(show(&a, "statement_timeout").await.0, "4242ms");
        exec(&a, "SET search_path = pg_catalog, public").await;
        exec(&a, "RESET statement_timeout").await;
        // B holds its backend in a transaction, F takes A's and leaves its own settings
        // there; A's next request gets a backend F used, with A's settings replayed.
        exec(&b, "BEGIN").await;
        exec(&f, "BEGIN; SET LOCAL statement_timeout = '9s'; COMMIT").await;
        assert_eq!(show(&a, "statement_timeout").await.0, "0");
        assert_eq!(show(&a, "search_path").await.0, "pg_catalog, public");
        assert_eq!(show(&b, "search_path").await.0, "\"$user\", public");
        exec(&b, "COMMIT").await;

        // Startup options count as settings too.
        let mut cfg = tokio_postgres::Config::new();
        let addr = env.sluice.listen_addr();
        cfg.host(addr.ip().to_string())
            .port(addr.port())
            .user("app")
            .password("app-secret")
            .dbname("app")
            .options("-c statement_timeout=1234")
            .application_name("session-test");
        let (c, conn) = cfg.connect(NoTls).await.expect("connect with options");
        tokio::spawn(conn);
        assert_eq!(show(&c, "statement_timeout").await.0, "1234ms");
        assert_eq!(show(&c, "application_name").await.0, "session-test");
    })
    .await;
    // The series exists at 0 from the start; a replay counts.
    let replays = env
        .sluice
        .metric("sluice_settings_replays_total{cluster=\"app\"}");
    assert!(replays.unwrap_or(0.0) >= 1.0, "replays counted: {replays:?}");
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_the_client_and_notifications_arrive() {
    let env = Env::start(1, "pool_size = 4");
    bounded(60, async {
        let addr = env.sluice.listen_addr();
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(addr.ip().to_string())
            .port(addr.port())
            .user("app")
            .password("app-secret")
            .dbname("app");
        let (listener, mut conn) = cfg.connect(NoTls).await.expect("connect");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let Ok(AsyncMessage::Notification(n)) = m {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        exec(&listener, "LISTEN sluice_test").await;
        // Other clients keep using the pool meanwhile.
        let other = env.app_client().await;
        for i in 0..5 {
            exec(&other, &format!("NOTIFY sluice_test, 'n{i}'")).await;
        }
        for i in 0..5 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("notification within 5 s")
                .expect("channel open");
            assert_eq!(got, ("sluice_test".to_string(), format!("n{i}")));
        }
        // The listener still works for ordinary queries on its pinned backend.
        assert_eq!(simple_column(&listener, "SELECT 1").await, ["1"]);
    })
    .await;
    let metrics = env.sluice.http_get("/metrics").1;
    assert!(
        metrics.contains("sluice_pinned_clients_total{cluster=\"app\",reason=\"listen\"} 1"),
        "{metrics}"
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_and_session_locks_pin_the_client() {
    let env = Env::start(1, "pool_size = 3");
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        exec(&a, "CREATE TEMP TABLE scratch (x int)").await;
        for i in 0..10 {
            // B's traffic would move an unpinned A between backends.
            exec(&b, "BEGIN; SELECT 1").await;
            exec(&a, &format!("INSERT INTO scratch VALUES ({i})")).await;
            exec(&b, "COMMIT").await;
        }
        assert_eq!(simple_column(&a, "SELECT count(*) FROM scratch").await, ["10"]);

        // A session advisory lock taken through sluice is held until released on the same
        // backend.
        let c = env.app_client().await;
        assert_eq!(
            simple_column(&c, "SELECT pg_advisory_lock(4242)::text").await,
            [""]
        );
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let held = simple_column(&direct, "SELECT pg_try_advisory_lock(4242)::text").await;
        assert_eq!(held, ["false"], "the lock must still be held by C's backend");
        exec(&b, "BEGIN; SELECT 1").await;
        assert_eq!(
            simple_column(&c, "SELECT pg_advisory_unlock(4242)::text").await,
            ["true"]
        );
        exec(&b, "COMMIT").await;
    })
    .await;
    let metrics = env.sluice.http_get("/metrics").1;
    for reason in ["temp_object", "advisory_lock"] {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "{metrics}");
    }
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_on_every_backend() {
    let env = Env::start(1, "consistency = \"primary\"\npool_size = 2");
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        let c = env.app_client().await;
        let stmt = a
            .prepare("SELECT $1::int + 1, pg_backend_pid()")
            .await
            .unwrap_or_else(|e| panic!("prepare: {}", describe(&e)));
        let mut pids = HashSet::new();
        for i in 0..8 {
            if i % 2 == 1 {
                // B and C take both backends (C by reclaiming the one A keeps parked); B
                // finishes, so A goes on on B's.
                exec(&b, "BEGIN; SELECT 1").await;
                exec(&c, "BEGIN; SELECT 1").await;
                exec(&b, "COMMIT").await;
            }
            let row = a
                .query_one(&stmt, &[&i])
                .await
                .unwrap_or_else(|e| panic!("execute {i}: {}", describe(&e)));
            assert_eq!(row.get::<_, i32>(0), i + 1);
            pids.insert(row.get::<_, i32>(1));
            if i % 2 == 1 {
                exec(&c, "COMMIT").await;
            }
        }
        assert!(
            pids.len() >= 2,
            "statement only ever ran on one backend: {pids:?}"
        );

        // B prepares the same text under its own name: both work, independently.
        let stmt_b = b.prepare("SELECT $1::int + 1, pg_backend_pid()").await.unwrap();
        assert_eq!(b.query_one(&stmt_b, &[&41]).await.unwrap().get::<_, i32>(0), 42);
        drop(stmt_b); // Close on B's side must not break A's statement
        assert_eq!(a.query_one(&stmt, &[&1]).await.unwrap().get::<_, i32>(0), 2);

        // After DEALLOCATE ALL the client's statements are gone, as on a plain server.
        exec(&a, "DEALLOCATE ALL").await;
        let err = a
            .query_one(&stmt, &[&1])
            .await
            .expect_err("statement was deallocated");
        assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{}", describe(&err));
        let again = a.prepare("SELECT $1::int * 2").await.unwrap();
        assert_eq!(a.query_one(&again, &[&21]).await.unwrap().get::<_, i32>(0), 42);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_sessions_stay_off_replicas_and_never_poison_the_pool() {
    // One backend per node: whatever A leaves on the replica backend, B gets next.
    let env = Env::start(1, "pool_size = 1");
    let primary = env.cluster.primary_port();
    let replica = env.cluster.replica_ports()[0];
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        // A makes serializable its default while on the replica (BEGIN READ ONLY goes there).
        exec(&a, "BEGIN READ ONLY; SET default_transaction_isolation = 'serializable'; COMMIT").await;
        assert_eq!(show(&a, "default_transaction_isolation").await.0, "serializable");
        // A standby refuses serializable transactions, so A's reads now use the primary.
        for _ in 0..3 {
            assert_eq!(crate::where_simple(&a, "").await, (false, primary));
        }
        let tx = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY; SELECT pg_is_in_recovery(), inet_server_port(); COMMIT";
        let rows = crate::support::simple_rows(&a, tx).await;
        assert_eq!(rows[0], ["f".to_string(), primary.to_string()]);
        // B gets the replica backend A used, reset to B's own settings, and reads there.
        for _ in 0..3 {
            assert_eq!(crate::where_simple(&b, "").await, (true, replica));
        }
        assert_eq!(show(&b, "default_transaction_isolation").await.0, "read committed");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_disconnected_but_open_transactions_are_not() {
    let env = Env::start(1, "client_idle_timeout = \"400ms\"");
    bounded(60, async {
        // A transaction holds its backend: its client is not idle in sluice's sense. (A client
        // that is cut before its BEGIN arrives — possible on a loaded machine — is replaced.)
        let mut attempts = 0;
        let in_tx = loop {
            attempts += 1;
            let c = env.app_client().await;
            if c.batch_execute("BEGIN").await.is_ok() {
                break c;
            }
            assert!(
                attempts < 20,
                "no client got its BEGIN in within 400 ms, 20 times"
            );
        };
        let idle = env.app_client().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !idle.is_closed() {
            assert!(
                std::time::Instant::now() < deadline,
                "an idle client must be disconnected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(simple_column(&in_tx, "SELECT 'still here'").await, ["still here"]);
        exec(&in_tx, "COMMIT").await;
    })
    .await;
    let logs = env.sluice.logs().join("\n");
    assert!(logs.contains("client_idle_timeout"), "{logs}");
    env.sluice.assert_no_unexpected_errors(&[]);
}
