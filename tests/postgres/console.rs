//! The admin console: the virtual database `sluice` (alias `pgbouncer`) on the PostgreSQL
//! listener, with PgBouncer's SHOW commands, PAUSE/RESUME, RECONNECT, RELOAD and SHUTDOWN.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::faults::backend_running;
use crate::pgbench::pgbench;

use crate::support::{self, bounded, pg_bin, simple_column, try_connect, PgCluster, Sluice};
use crate::{wait_all_probed, Env};

/// The console users, configured as ordinary users of the cluster.
const CONSOLE_USERS: &str = r#"
[[clusters.users]]
name = "boss"
password = "boss-secret"

[[clusters.users]]
name = "viewer"
password = "viewer-secret"
"#;

/// A cluster behind a sluice whose console admits `boss` (admin) and `viewer` (stats);
/// `admin` adds keys to `[admin]`, `extra` to `[[clusters]]`.
fn start(replicas: usize, extra: &str, admin: &str) -> Env {
    let cluster = PgCluster::start(replicas);
    let (toml, _, _) = support::sluice_config(&cluster, extra);
    let toml = toml.replacen(
        "[admin]\n",
        &format!("[admin]\nadmin_users = [\"boss\"]\nstats_users = [\"viewer\"]\n{admin}\n"),
        1,
    ) + CONSOLE_USERS;
    let sluice = Sluice::start(&toml);
    wait_all_probed(&sluice, cluster.node_ports().len());
    Env { sluice, cluster }
}

async fn console(env: &Env, user: &str) -> Client {
    support::connect(
        env.sluice.listen_addr(),
        user,
        &format!("{user}-secret"),
        "sluice",
    )
    .await
}

/// A console result set: column names, and rows of text values ("NULL" for NULL).
pub(crate) async fn show(client: &Client, command: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let messages = match client.simple_query(command).await {
        Ok(m) => m,
        Err(e) => panic!("{command}: {}", support::describe(&e)),
    };
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => {}
        }
    }
    (columns, rows)
}

/// The value of `column` in the first row whose `key_column` is `key`.
pub(crate) fn cell(
    result: &(Vec<String>, Vec<Vec<String>>),
    key_column: &str,
    key: &str,
    column: &str,
) -> Option<String> {
    let (columns, rows) = result;
    let k = columns.iter().position(|c| c == key_column)?;
    let c = columns.iter().position(|c| c == column)?;
    rows.iter().find(|r| r[k] == key).map(|r| r[c].clone())
}

/// Polls `SHOW POOLS` until database `app` has `waiting` clients in cl_waiting.
async fn wait_for_waiting(admin: &Client, waiting: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pools = show(admin, "SHOW POOLS").await;
        let now: usize = pools
            .1
            .iter()
            .filter(|r| r[0] == "app")
            .map(|r| r[3].parse::<usize>().unwrap())
            .sum();
        if now == waiting {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cl_waiting never reached {waiting}: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs psql against the console; blocking, so callers run it on the blocking pool.
fn psql_console(port: u16, user: &str, command: &str) -> std::process::Output {
    Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            "pgbouncer",
        ])
        .args(["-c", command])
        .env("PGPASSWORD", format!("{user}-secret"))
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_answer_with_pgbouncer_columns() {
    let env = start(1, "", "");
    let port = env.sluice.listen_addr().port();
    bounded(60, async {
        // Some traffic first, so that pools and stats have something to show.
        let app = env.app_client().await;
        for _ in 0..3 {
            assert_eq!(simple_column(&app, "SELECT 1").await, ["1"]);
        }
        app.query_one("SELECT 1", &[]).await.expect("extended");

        // psql, through the `pgbouncer` alias, as exporters and operators do.
        let out = tokio::task::spawn_blocking(move || psql_console(port, "viewer", "SHOW POOLS"))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "psql: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let header = stdout.lines().next().unwrap_or_default();
        for column in [
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "maxwait",
            "pool_mode",
        ] {
            assert!(
                header.contains(column),
                "SHOW POOLS header {header:?} lacks {column}"
            );
        }

        let admin = console(&env, "boss").await;
        let pools = show(&admin, "SHOW POOLS").await;
        assert_eq!(
            pools.0[..17],
            [
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
                "load_balance_hosts"
            ]
        );
        let app_pool = pools
            .1
            .iter()
            .find(|r| r[0] == "app" && r[1] == "app")
            .expect("pool app/app");
        assert_eq!(app_pool[2], "1", "cl_active: the one app client: {pools:?}");
        assert_eq!(app_pool[3], "0", "cl_waiting: {pools:?}");
        assert_eq!(app_pool[15], "transaction");

        let clients = show(&admin, "SHOW CLIENTS").await;
        assert_eq!(
            clients.0[..5],
            ["type", "user", "database", "replication", "state"]
        );
        assert!(
            clients
                .1
                .iter()
                .any(|r| r[1] == "app" && r[2] == "app" && r[0] == "C"),
            "{clients:?}"
        );
        assert!(
            clients.1.iter().any(|r| r[1] == "boss" && r[2] == "sluice"),
            "{clients:?}"
        );

        let servers = show(&admin, "SHOW SERVERS").await;
        assert!(
            servers.1.iter().any(|r| r[0] == "S" && r[1] == "app"),
            "{servers:?}"
        );
        let pids: Vec<&String> = servers.1.iter().map(|r| &r[16]).collect();
        assert!(
            pids.iter().all(|p| p.parse::<i32>().unwrap() > 0),
            "remote_pid: {servers:?}"
        );

        let stats = show(&admin, "SHOW STATS").await;
        let xacts: u64 = cell(&stats, "database", "app", "total_xact_count")
            .unwrap()
            .parse()
            .unwrap();
        let queries: u64 = cell(&stats, "database", "app", "total_query_count")
            .unwrap()
            .parse()
            .unwrap();
        assert!(xacts >= 4 && queries >= 4, "{stats:?}");
        let received: u64 = cell(&stats, "database", "app", "total_received")
            .unwrap()
            .parse()
            .unwrap();
        assert!(received > 0, "{stats:?}");

        let dbs = show(&admin, "SHOW DATABASES").await;
        assert_eq!(cell(&dbs, "name", "app", "paused").as_deref(), Some("0"));
        assert_eq!(
            cell(&dbs, "name", "app", "port"),
            Some(env.cluster.primary_port().to_string()),
            "host/port are the primary's: {dbs:?}"
        );

        let users = show(&admin, "SHOW USERS").await;
        assert_eq!(
            cell(&users, "name", "app", "current_client_connections").as_deref(),
            Some("1")
        );

        let config = show(&admin, "SHOW CONFIG").await;
        assert_eq!(config.0, ["key", "value", "default", "changeable"]);
        assert_eq!(
            cell(&config, "key", "app.pool_mode", "value").as_deref(),
            Some("transaction")
        );
        assert_eq!(
            cell(&config, "key", "admin.pause_timeout", "value").as_deref(),
            Some("30s")
        );

        let version = show(&admin, "SHOW VERSION").await;
        assert!(version.1[0][0].starts_with("sluice "), "{version:?}");

        let lists = show(&admin, "show lists;").await;
        let used: u64 = cell(&lists, "list", "used_clients", "items")
            .unwrap()
            .parse()
            .unwrap();
        assert!(used >= 2, "{lists:?}");

        let nodes = show(&admin, "SHOW NODES").await;
        let primary = format!("127.0.0.1:{}", env.cluster.primary_port());
        let replica = format!("127.0.0.1:{}", env.cluster.replica_ports()[0]);
        assert_eq!(
            cell(&nodes, "address", &primary, "role").as_deref(),
            Some("primary")
        );
        assert_eq!(
            cell(&nodes, "address", &replica, "role").as_deref(),
            Some("replica")
        );
        assert_eq!(
            cell(&nodes, "address", &replica, "healthy").as_deref(),
            Some("yes")
        );
        let lag: u64 = cell(&nodes, "address", &replica, "lag_bytes")
            .unwrap()
            .parse()
            .unwrap();
        assert!(lag < 16 * 1024 * 1024, "{nodes:?}");
        // No CQL cluster here: an empty ring.
        assert!(show(&admin, "SHOW RING").await.1.is_empty());
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_refuses_what_it_must() {
    let env = start(0, "", "");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        // A user that is not a console user: refused after authenticating.
        let err = try_connect(addr, "app", "app-secret", "sluice")
            .await
            .err()
            .unwrap_or_else(|| panic!("app let in"));
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("28000"),
            "{err:?}"
        );
        // A console user with a wrong password: the usual 28P01.
        let err = try_connect(addr, "boss", "nope", "sluice")
            .await
            .err()
            .unwrap_or_else(|| panic!("wrong password let in"));
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("28P01"),
            "{err:?}"
        );

        let viewer = console(&env, "viewer").await;
        for command in ["PAUSE", "RESUME app", "RECONNECT", "RELOAD", "SHUTDOWN"] {
            let err = viewer
                .simple_query(command)
                .await
                .err()
                .unwrap_or_else(|| panic!("{command} allowed"));
            let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
            assert_eq!(
                (db.code().code(), db.message()),
                ("08P01", "admin access needed"),
                "{command}"
            );
        }
        // The viewer still reads, and the connection goes on after errors.
        assert!(!show(&viewer, "SHOW POOLS").await.0.is_empty());

        let admin = console(&env, "boss").await;
        let err = admin
            .simple_query("SELECT 1")
            .await
            .err()
            .unwrap_or_else(|| panic!("SELECT on the console"));
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "08P01");
        assert!(
            db.message().contains("invalid command 'SELECT 1'"),
            "{}",
            db.message()
        );
        let err = admin
            .simple_query("SHOW NOTHING")
            .await
            .err()
            .unwrap_or_else(|| panic!("SHOW NOTHING"));
        assert_eq!(err.as_db_error().unwrap().code().code(), "08P01");
        // Extended protocol: an error, and the connection stays usable.
        let err = admin
            .query("SHOW POOLS", &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("extended protocol"));
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("only the simple query protocol"),
            "{err:?}"
        );
        assert!(!show(&admin, "SHOW VERSION").await.1.is_empty());
        assert!(
            admin.simple_query("RESUME").await.is_err(),
            "RESUME while nothing is paused"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_transactions_holds_new_ones_and_resume_releases_them() {
    let env = start(1, "", "");
    bounded(90, async {
        let admin = console(&env, "boss").await;
        let watcher = console(&env, "viewer").await;
        let in_tx = env.app_client().await;
        support::exec(&in_tx, "CREATE TABLE IF NOT EXISTS t (x int)").await;
        support::exec(&in_tx, "BEGIN; INSERT INTO t VALUES (1)").await;

        // PAUSE waits for the open transaction.
        let pause = tokio::spawn(async move { admin.simple_query("PAUSE app").await.map(|_| admin) });
        let deadline = Instant::now() + Duration::from_secs(10);
        while cell(&show(&watcher, "SHOW DATABASES").await, "name", "app", "paused").as_deref() != Some("1") {
            assert!(Instant::now() < deadline, "app never paused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The client mid-transaction keeps its backend and finishes its transaction.
        support::exec(&in_tx, "INSERT INTO t VALUES (2)").await;
        assert!(!pause.is_finished(), "PAUSE returned with a transaction open");
        support::exec(&in_tx, "COMMIT").await;
        let admin = pause.await.unwrap().expect("PAUSE");

        // A new transaction is held (cl_waiting), not failed.
        let held = tokio::spawn(async move { simple_column(&in_tx, "SELECT count(*) FROM t").await });
        wait_for_waiting(&watcher, 1).await;
        assert!(!held.is_finished());
        // A new client is held too (at login).
        let addr = env.sluice.listen_addr();
        let late = tokio::spawn(async move { support::connect(addr, "app", "app-secret", "app").await });
        show(&admin, "RESUME app").await;
        let rows = held.await.unwrap();
        assert!(rows == ["2"] || rows == ["0"], "{rows:?}");
        let late = late.await.unwrap();
        assert_eq!(simple_column(&late, "SELECT 1").await, ["1"]);
        wait_for_waiting(&watcher, 0).await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A login held by PAUSE is bounded by pause_timeout only: it outlives login_timeout and logs
/// in once RESUME comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_held_by_pause_does_not_time_out_through_login_timeout() {
    let env = start(0, "login_timeout = \"1s\"", "pause_timeout = \"60s\"");
    bounded(60, async {
        let admin = console(&env, "boss").await;
        show(&admin, "PAUSE app").await;
        let addr = env.sluice.listen_addr();
        let started = Instant::now();
        let late = tokio::spawn(async move { try_connect(addr, "app", "app-secret", "app").await });
        // Three login_timeouts pass while the login is held.
        while started.elapsed() < Duration::from_secs(3) {
            if late.is_finished() {
                let ended = late.await.unwrap().err().map(|e| support::describe(&e));
                panic!("the held login ended: {ended:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        show(&admin, "RESUME app").await;
        let late = late
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("held login failed: {}", support::describe(&e)));
        assert_eq!(simple_column(&late, "SELECT 1").await, ["1"]);
    })
    .await;
    assert!(
        !env.sluice
            .logs()
            .iter()
            .any(|l| l.contains("within login_timeout")),
        "a held login was cut by login_timeout"
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_held_past_pause_timeout_fails_with_57p03() {
    let env = start(0, "", "pause_timeout = \"1s\"");
    bounded(60, async {
        let admin = console(&env, "boss").await;
        let app = env.app_client().await;
        show(&admin, "PAUSE").await;
        let started = Instant::now();
        let err = app
            .simple_query("SELECT 1")
            .await
            .err()
            .unwrap_or_else(|| panic!("a paused query ran"));
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(db.code().code(), "57P03", "{}", db.message());
        assert!(db.message().contains("paused"), "{}", db.message());
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        show(&admin, "RESUME").await;
        // The client's connection is still good.
        assert_eq!(simple_column(&app, "SELECT 1").await, ["1"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_gives_up_a_held_transaction() {
    let env = start(0, "", "");
    bounded(60, async {
        let admin = console(&env, "boss").await;
        let app = env.app_client().await;
        let cancel = app.cancel_token();
        show(&admin, "PAUSE app").await;
        let held = tokio::spawn(async move {
            let r = app.simple_query("SELECT 1").await.map(drop);
            (r, app)
        });
        wait_for_waiting(&admin, 1).await;
        cancel
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel request sent");
        let (result, app) = held.await.unwrap();
        let err = result
            .err()
            .unwrap_or_else(|| panic!("the held query ran while paused"));
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{err:?}"
        );
        show(&admin, "RESUME app").await;
        assert_eq!(simple_column(&app, "SELECT 1").await, ["1"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_across_pause_and_resume_has_no_errors() {
    let env = start(1, "", "");
    let port = env.sluice.listen_addr().port();
    bounded(180, async {
        let init = pgbench(env.cluster.primary_port(), &["-i", "-s", "1"]).await;
        assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        env.cluster.wait_replicated().await;
        let admin = console(&env, "boss").await;
        let run = tokio::spawn(pgbench(port, &["-c", "8", "-j", "2", "-T", "8", "-M", "extended"]));
        let mut cycles = 0;
        let mut held_seen = 0;
        while !run.is_finished() && cycles < 5 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let started = Instant::now();
            show(&admin, "PAUSE app").await;
            let paused_in = started.elapsed();
            // While paused, the clients wait instead of failing.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let pools = show(&admin, "SHOW POOLS").await;
                let waiting: usize = pools.1.iter().filter(|r| r[0] == "app").map(|r| r[3].parse::<usize>().unwrap()).sum();
                if waiting > 0 || run.is_finished() || Instant::now() > deadline {
                    held_seen = held_seen.max(waiting);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            show(&admin, "RESUME app").await;
            eprintln!("[console] PAUSE took {paused_in:?}");
            cycles += 1;
        }
        let out = run.await.unwrap();
        let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{report}");
        assert!(report.contains("number of failed transactions: 0"), "{report}");
        assert!(cycles >= 3, "only {cycles} PAUSE/RESUME cycles ran during pgbench");
        assert!(held_seen > 0, "no client was ever seen held");
        eprintln!("[console] {cycles} PAUSE/RESUME cycles under pgbench, up to {held_seen} clients held, 0 failed transactions");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A planned switchover behind PAUSE: pgbench TPC-B at 16 clients, without retries, runs
/// while the console pauses the database (transactions in flight finish), the old primary is
/// stopped cleanly, the replica promoted, sluice sees the new primary, the console resumes,
/// and the old primary comes back as a replica of the new one. No transaction fails; the
/// pause the clients saw is printed (and quoted in the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_behind_pause_fails_no_transaction() {
    let env = start(1, "failover_wait = \"30s\"", "pause_timeout = \"60s\"");
    let port = env.sluice.listen_addr().port();
    let (old, new) = (env.cluster.primary_port(), env.cluster.replica_ports()[0]);
    bounded(240, async {
        let init = pgbench(old, &["-i", "-s", "2"]).await;
        assert!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        env.cluster.wait_replicated().await;
        let admin = console(&env, "boss").await;
        let run = tokio::spawn(pgbench(port, &["-c", "16", "-j", "2", "-T", "14"]));
        // Let the load settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!run.is_finished(), "pgbench ended early");
        let paused = Instant::now();
        show(&admin, "PAUSE app").await;
        let drained = paused.elapsed();
        let stop = Instant::now();
        let cluster = &env.cluster;
        tokio::task::block_in_place(|| {
            cluster.stop_node(old);
            cluster.promote(0);
        });
        let switched = stop.elapsed();
        // Resume once sluice routes writes to the promoted node.
        let deadline = Instant::now() + Duration::from_secs(30);
        let promoted = format!("127.0.0.1:{new}");
        loop {
            let nodes = show(&admin, "SHOW NODES").await;
            if cell(&nodes, "address", &promoted, "role").as_deref() == Some("primary") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sluice never saw the promoted node as primary: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        show(&admin, "RESUME app").await;
        let held = paused.elapsed();
        tokio::task::block_in_place(|| cluster.follow(old, new));
        let out = run.await.unwrap();
        let report = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{report}");
        assert!(report.contains("number of failed transactions: 0"), "{report}");
        // The old primary serves reads again, as a replica.
        let deadline = Instant::now() + Duration::from_secs(30);
        let old_addr = format!("127.0.0.1:{old}");
        loop {
            let nodes = show(&admin, "SHOW NODES").await;
            let role = cell(&nodes, "address", &old_addr, "role");
            let healthy = cell(&nodes, "address", &old_addr, "healthy");
            if role.as_deref() == Some("replica") && healthy.as_deref() == Some("yes") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the old primary did not come back as a replica: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let tps = report
            .lines()
            .find(|l| l.starts_with("tps"))
            .unwrap_or("")
            .to_string();
        eprintln!(
            "[switchover] 16 clients TPC-B: PAUSE drained in {drained:?}, stop + promote took {switched:?}, \
             clients held {held:?} in all; 0 failed transactions; {tps}"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[
        "lost the connection",
        "marking the node down",
        "terminating connection",
        "probe",
    ]);
}

/// RECONNECT closes idle server connections at once and marks busy ones `close_needed` in
/// SHOW SERVERS (as PgBouncer does) until their client releases them, when they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_marks_busy_server_connections_close_needed() {
    let env = start(0, "", "");
    bounded(60, async {
        let admin = console(&env, "boss").await;
        let app = env.app_client().await;
        support::exec(&app, "BEGIN").await;
        let pid = simple_column(&app, "SELECT pg_backend_pid()").await.remove(0);
        let servers = show(&admin, "SHOW SERVERS").await;
        assert_eq!(
            cell(&servers, "remote_pid", &pid, "close_needed").as_deref(),
            Some("0"),
            "{servers:?}"
        );
        show(&admin, "RECONNECT app").await;
        let servers = show(&admin, "SHOW SERVERS").await;
        assert_eq!(
            cell(&servers, "remote_pid", &pid, "close_needed").as_deref(),
            Some("1"),
            "the busy connection is marked: {servers:?}"
        );
        assert_eq!(
            cell(&servers, "remote_pid", &pid, "state").as_deref(),
            Some("active")
        );
        // The transaction goes on undisturbed on it.
        assert_eq!(
            simple_column(&app, "SELECT pg_backend_pid()").await,
            [pid.as_str()]
        );
        support::exec(&app, "COMMIT").await;
        // Released: closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let servers = show(&admin, "SHOW SERVERS").await;
            if cell(&servers, "remote_pid", &pid, "id").is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "never closed: {servers:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next transaction has a new, unmarked connection.
        support::exec(&app, "BEGIN").await;
        let next = simple_column(&app, "SELECT pg_backend_pid()").await.remove(0);
        assert_ne!(next, pid);
        let servers = show(&admin, "SHOW SERVERS").await;
        assert_eq!(
            cell(&servers, "remote_pid", &next, "close_needed").as_deref(),
            Some("0"),
            "{servers:?}"
        );
        support::exec(&app, "COMMIT").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// RECONNECT drains the pools while a query is in flight: the query is left alone and
/// answered (a drain ends nothing by itself); a node marked down afterwards (frozen with
/// SIGSTOP, its probe unanswered) still ends the query in flight on it at once with 08006,
/// not when the query would have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_leaves_a_query_in_flight_alone_and_a_node_marked_down_still_ends_it() {
    let env = start(0, "probe_interval = \"200ms\"\nprobe_timeout = \"600ms\"", "");
    let primary = env.cluster.primary_port();
    let outcome = bounded(60, async {
        let admin = console(&env, "boss").await;
        let direct = env.cluster.superuser_client(primary).await;
        let app = env.app_client().await;
        // 1. In flight across a RECONNECT: answered.
        let running = tokio::spawn(async move {
            let r = app.simple_query("SELECT pg_sleep(1.5), 'slept'").await;
            (r, app)
        });
        backend_running(&direct, "SELECT pg_sleep(1.5), 'slept'").await;
        show(&admin, "RECONNECT app").await;
        let (r, app) = running.await.expect("query task");
        let rows = r.expect("the query in flight across RECONNECT failed");
        assert!(
            rows.iter()
                .any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(1) == Some("slept"))),
            "no row"
        );
        // 2. In flight across another RECONNECT, then the node freezes: ended with 08006.
        let running = tokio::spawn(async move {
            let started = Instant::now();
            let r = app.simple_query("SELECT pg_sleep(30)").await;
            (r, started.elapsed())
        });
        backend_running(&direct, "SELECT pg_sleep(30)").await;
        show(&admin, "RECONNECT app").await;
        env.cluster.signal_node(primary, "STOP");
        let (r, took) = running.await.expect("query task");
        env.cluster.signal_node(primary, "CONT");
        (r.err().and_then(|e| e.code().map(|c| c.code().to_string())), took)
    })
    .await;
    eprintln!("[console] query in flight on a node frozen after RECONNECT: {outcome:?}");
    assert_eq!(outcome.0.as_deref(), Some("08006"), "{outcome:?}");
    assert!(
        outcome.1 < Duration::from_secs(10),
        "ended only after {:?}",
        outcome.1
    );
    env.sluice
        .assert_no_unexpected_errors(&[&format!("127.0.0.1:{primary}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_reload_and_shutdown() {
    let env = start(0, "", "");
    bounded(60, async {
        let app = env.app_client().await;
        assert_eq!(simple_column(&app, "SELECT 1").await, ["1"]);
        let admin = console(&env, "boss").await;
        let before = show(&admin, "SHOW SERVERS").await;
        let pids: Vec<String> = before
            .1
            .iter()
            .filter(|r| r[1] == "app")
            .map(|r| r[16].clone())
            .collect();
        assert!(!pids.is_empty(), "{before:?}");

        // RECONNECT: the app's next transaction runs on a new server connection.
        show(&admin, "RECONNECT app").await;
        let pid = simple_column(&app, "SELECT pg_backend_pid()").await.remove(0);
        assert!(
            !pids.contains(&pid),
            "still on an old server connection {pid} ({pids:?})"
        );

        // RELOAD: the file's new pause_timeout is in force.
        let path = env.sluice.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("[admin]\n", "[admin]\npause_timeout = \"7s\"\n", 1),
        )
        .unwrap();
        show(&admin, "RELOAD").await;
        let config = show(&admin, "SHOW CONFIG").await;
        assert_eq!(
            cell(&config, "key", "admin.pause_timeout", "value").as_deref(),
            Some("7s")
        );
        // A bad file: RELOAD says why, and nothing changes.
        std::fs::write(
            &path,
            text.replacen("[admin]\n", "[admin]\npause_timeout = \"never\"\n", 1),
        )
        .unwrap();
        let err = admin
            .simple_query("RELOAD")
            .await
            .err()
            .unwrap_or_else(|| panic!("bad RELOAD succeeded"));
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("admin.pause_timeout"),
            "{err:?}"
        );
        assert_eq!(simple_column(&app, "SELECT 2").await, ["2"]);

        // SHUTDOWN: graceful, as on SIGTERM.
        let _ = admin.simple_query("SHUTDOWN").await;
        let status = env.sluice.wait_exit(Duration::from_secs(20));
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
    })
    .await;
    let logs = env.sluice.logs();
    assert!(
        logs.iter().any(|l| l.contains("console SHUTDOWN")),
        "no shutdown log"
    );
}
