//! Hot reload and graceful shutdown of the real binary: SIGHUP and the file watch apply a new
//! configuration atomically (unchanged clusters keep their pools; a bad file changes nothing
//! and every error is logged); SIGTERM fails /readyz first, stops accepting, and lets
//! in-flight transactions finish up to the drain timeout.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{bounded, connect, exec, free_port, simple_column, PgCluster, Sluice};

/// A config with one `[[clusters]]` per (name, listen port, extra settings), all in front of
/// the same PostgreSQL node; `head` goes before the clusters.
fn config(admin: u16, pg: u16, head: &str, clusters: &[(&str, u16, &str)]) -> String {
    let mut out = format!("{head}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    for (name, listen, extra) in clusters {
        out.push_str(&format!(
            "\n[[clusters]]\nname = \"{name}\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:{listen}\"\n{extra}\n\
             [clusters.discovery]\nstatic = [\"127.0.0.1:{pg}\"]\n\
             [[clusters.users]]\nname = \"app\"\npassword = \"app-secret\"\n"
        ));
    }
    out
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until a log line contains `text`, or panics with the logs.
fn wait_log(sluice: &Sluice, text: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !sluice.logs().iter().any(|l| l.contains(text)) {
        assert!(
            Instant::now() < deadline,
            "no log line with {text:?}:\n{}",
            sluice.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&addr(port), Duration::from_millis(500)).is_ok()
}

async fn backend_pid(client: &tokio_postgres::Client) -> String {
    simple_column(client, "SELECT pg_backend_pid()").await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_config_and_keeps_unchanged_pools() {
    let cluster = PgCluster::start(0);
    let pg = cluster.primary_port();
    let (admin, keep, change, extra) = (free_port(), free_port(), free_port(), free_port());
    let before = config(
        admin,
        pg,
        "",
        &[
            ("keep", keep, "pool_size = 1"),
            ("change", change, "pool_size = 5"),
        ],
    );
    let sluice = Sluice::start(&before);
    bounded(60, async {
        let kept = connect(addr(keep), "app", "app-secret", "app").await;
        let kept_pid = backend_pid(&kept).await;
        let changed = connect(addr(change), "app", "app-secret", "app").await;
        let changed_pid = backend_pid(&changed).await;
        exec(&changed, "CREATE TABLE IF NOT EXISTS r (id int)").await;
        // A transaction open on the cluster being replaced.
        exec(&changed, "BEGIN; INSERT INTO r VALUES (1)").await;

        let after = config(
            admin,
            pg,
            "",
            &[
                ("keep", keep, "pool_size = 1"),
                ("change", change, "pool_size = 3"),
                ("extra", extra, ""),
            ],
        );
        std::fs::write(sluice.config_path(), after).unwrap();
        sluice.signal("HUP");
        wait_log(&sluice, "configuration reloaded", Duration::from_secs(10));

        // Unchanged: a new client gets the backend the first one used (its pool has one
        // connection, which the first client keeps parked until someone else needs it).
        let kept2 = connect(addr(keep), "app", "app-secret", "app").await;
        assert_eq!(
            backend_pid(&kept2).await,
            kept_pid,
            "the unchanged cluster kept its pool"
        );
        assert_eq!(backend_pid(&kept).await, kept_pid);
        // Changed: the open transaction finishes on the old cluster; new clients get the
        // new one, with a new pool.
        exec(&changed, "COMMIT").await;
        let changed2 = connect(addr(change), "app", "app-secret", "app").await;
        assert_ne!(
            backend_pid(&changed2).await,
            changed_pid,
            "the changed cluster has a new pool"
        );
        assert_eq!(simple_column(&changed2, "SELECT count(*) FROM r").await, ["1"]);
        // Added.
        let added = connect(addr(extra), "app", "app-secret", "app").await;
        assert_eq!(simple_column(&added, "SELECT 1").await, ["1"]);
        assert_eq!(
            sluice.metric("sluice_config_reloads_total{result=\"ok\"}"),
            Some(1.0)
        );

        // Removing a cluster closes its listener.
        let fewer = config(
            admin,
            pg,
            "",
            &[
                ("keep", keep, "pool_size = 1"),
                ("change", change, "pool_size = 3"),
            ],
        );
        std::fs::write(sluice.config_path(), fewer).unwrap();
        sluice.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while accepts(extra) {
            assert!(Instant::now() < deadline, "the removed cluster still listens");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(backend_pid(&kept).await, kept_pid);
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_changes_nothing_and_every_error_is_logged() {
    let cluster = PgCluster::start(0);
    let pg = cluster.primary_port();
    let (admin, app, other) = (free_port(), free_port(), free_port());
    let sluice = Sluice::start(&config(admin, pg, "", &[("app", app, "")]));
    bounded(60, async {
        let client = connect(addr(app), "app", "app-secret", "app").await;
        // Two errors in one file: both are logged, nothing is applied.
        let bad = config(
            admin,
            pg,
            "",
            &[("app", app, "pool_size = 0\nbogus = 1"), ("other", other, "")],
        );
        std::fs::write(sluice.config_path(), bad).unwrap();
        sluice.signal("HUP");
        wait_log(&sluice, "configuration reload failed", Duration::from_secs(10));
        let logs = sluice.logs().join("\n");
        assert!(logs.contains("clusters[0].pool_size"), "{logs}");
        assert!(logs.contains("clusters[0].bogus"), "{logs}");
        assert!(!accepts(other), "nothing of a rejected file is applied");
        assert_eq!(simple_column(&client, "SELECT 1").await, ["1"]);

        // A valid file whose new listener cannot bind: also rejected as a whole.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let unbindable = config(
            admin,
            pg,
            "",
            &[("app", app, ""), ("other", other, ""), ("third", taken_port, "")],
        );
        std::fs::write(sluice.config_path(), unbindable).unwrap();
        sluice.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while sluice
            .logs()
            .iter()
            .filter(|l| l.contains("configuration reload failed"))
            .count()
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "second reload not rejected:\n{}",
                sluice.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(sluice
            .logs()
            .iter()
            .any(|l| l.contains(&format!("cannot listen on 127.0.0.1:{taken_port}"))));
        assert!(!accepts(other), "a half-applied reload opened a listener");
        assert_eq!(simple_column(&client, "SELECT 1").await, ["1"]);
        assert_eq!(
            sluice.metric("sluice_config_reloads_total{result=\"error\"}"),
            Some(2.0)
        );
    })
    .await;
    sluice.assert_no_unexpected_errors(&["reload"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_reloads_when_the_file_changes() {
    let cluster = PgCluster::start(0);
    let pg = cluster.primary_port();
    let (admin, app, extra) = (free_port(), free_port(), free_port());
    let head = "[reload]\nwatch = true\n";
    let sluice = Sluice::start(&config(admin, pg, head, &[("app", app, "")]));
    bounded(30, async {
        wait_log(&sluice, "watching the configuration file", Duration::from_secs(5));
        // Replace the file the way editors and ConfigMap updates do: write aside, rename.
        let next = config(admin, pg, head, &[("app", app, ""), ("extra", extra, "")]);
        let tmp = sluice.config_path().with_extension("tmp");
        std::fs::write(&tmp, next).unwrap();
        std::fs::rename(&tmp, sluice.config_path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepts(extra) {
            assert!(
                Instant::now() < deadline,
                "the file change was not applied:\n{}",
                sluice.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let added = connect(addr(extra), "app", "app-secret", "app").await;
        assert_eq!(simple_column(&added, "SELECT 1").await, ["1"]);
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_first_and_lets_transactions_finish() {
    let cluster = PgCluster::start(0);
    let pg = cluster.primary_port();
    let (admin, app) = (free_port(), free_port());
    let head = "[shutdown]\nreadiness_delay = \"1s\"\ndrain_timeout = \"10s\"\n";
    let sluice = Sluice::start(&config(admin, pg, head, &[("app", app, "")]));
    bounded(60, async {
        let client = connect(addr(app), "app", "app-secret", "app").await;
        exec(&client, "CREATE TABLE s (id int)").await;
        let idle = connect(addr(app), "app", "app-secret", "app").await;
        exec(&client, "BEGIN; INSERT INTO s VALUES (1)").await;

        sluice.signal("TERM");
        let signalled = Instant::now();
        // /readyz fails at once, while the listener still accepts for readiness_delay.
        loop {
            let (status, body) = sluice.http_get("/readyz");
            if status == 503 {
                assert!(body.contains("shutting down"), "{body}");
                break;
            }
            assert!(
                signalled.elapsed() < Duration::from_millis(500),
                "/readyz still {status}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(accepts(app), "connections are refused before readiness_delay");
        // Then the listener closes.
        while accepts(app) {
            assert!(signalled.elapsed() < Duration::from_secs(4), "still accepting");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            signalled.elapsed() >= Duration::from_millis(900),
            "closed before readiness_delay"
        );
        // The transaction in flight finishes, and then sluice leaves.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            sluice.exit_status().is_none(),
            "sluice left with a transaction in flight"
        );
        exec(&client, "INSERT INTO s VALUES (2); COMMIT").await;
        let status = tokio::task::block_in_place(|| sluice.wait_exit(Duration::from_secs(5)));
        let status = status.expect("sluice exits once nothing is in flight");
        assert!(status.success(), "{status}");
        let direct = cluster.superuser_client(pg).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM s", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "the transaction committed");
        assert!(
            idle.simple_query("SELECT 1").await.is_err(),
            "idle clients are disconnected"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_ends_transactions_that_do_not_finish() {
    let cluster = PgCluster::start(0);
    let pg = cluster.primary_port();
    let (admin, app) = (free_port(), free_port());
    let head = "[shutdown]\ndrain_timeout = \"1s\"\n";
    let sluice = Sluice::start(&config(admin, pg, head, &[("app", app, "")]));
    bounded(30, async {
        let client = connect(addr(app), "app", "app-secret", "app").await;
        exec(&client, "BEGIN; SELECT 1").await;
        let signalled = Instant::now();
        sluice.signal("TERM");
        let status = tokio::task::block_in_place(|| sluice.wait_exit(Duration::from_secs(6)));
        let took = signalled.elapsed();
        assert!(status.is_some(), "sluice did not stop after the drain timeout");
        assert!(
            took >= Duration::from_millis(900),
            "stopped before the drain timeout: {took:?}"
        );
        assert!(
            client.simple_query("SELECT 1").await.is_err(),
            "the connection is closed"
        );
        assert!(sluice.logs().iter().any(|l| l.contains("drain timeout reached")));
    })
    .await;
}
