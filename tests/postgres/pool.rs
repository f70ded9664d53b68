//! Transaction pooling: exhaustion, and clients that vanish mid-transaction.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::support::{bounded, describe, exec, pg_bin, simple_column, try_connect_with_handle};
use crate::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_fails_the_query_and_the_connection_recovers() {
    let env = Env::start(
        1,
        "pool_size = 1\ncheckout_timeout = \"300ms\"\nconsistency = \"primary\"",
    );
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        exec(&a, "CREATE TABLE t (id int)").await;

        exec(&a, "BEGIN").await;
        exec(&a, "INSERT INTO t VALUES (1)").await;

        // A holds the only backend connection: B waits checkout_timeout, then gets 53300.
        let started = Instant::now();
        let err = b
            .simple_query("SELECT count(*) FROM t")
            .await
            .expect_err("B got a backend although A holds the only one");
        let waited = started.elapsed();
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("B's failure is not an ErrorResponse: {err:?}"));
        assert_eq!(db.code().code(), "53300", "{}", describe(&err));
        assert!(
            db.message().starts_with("sluice: no backend connection"),
            "message: {:?}",
            db.message()
        );
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "B waited {waited:?} with checkout_timeout 300ms"
        );
        eprintln!("pool checkout failed after {waited:?}");

        // The extended protocol fails the same way, and the connection stays usable.
        let err = b
            .query_one("SELECT 1", &[])
            .await
            .expect_err("extended query got a backend");
        assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err:?}");

        exec(&a, "COMMIT").await;
        assert_eq!(simple_column(&b, "SELECT count(*) FROM t").await, ["1"]);
        let n: i64 = b
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap_or_else(|e| panic!("B after A committed: {}", describe(&e)))
            .get(0);
        assert_eq!(n, 1);
        assert_eq!(simple_column(&a, "SELECT count(*) FROM t").await, ["1"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Open transactions of user `app` on the primary, as the primary itself reports them.
async fn open_transactions(direct: &Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = 'app' AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Waits until the primary has exactly `want` open transactions; returns how long it took.
async fn wait_open_transactions(direct: &Client, want: i64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let open = open_transactions(direct).await;
        if open == want {
            return started.elapsed();
        }
        if started.elapsed() > limit {
            let activity: Vec<String> = direct
                .query(
                    "SELECT pid, state, query, client_port FROM pg_stat_activity \
                     WHERE usename = 'app'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .iter()
                .map(|r| {
                    let (pid, state, query, port): (i32, Option<String>, Option<String>, Option<i32>) =
                        (r.get(0), r.get(1), r.get(2), r.get(3));
                    format!("pid {pid} from port {port:?}: {state:?} after {query:?}")
                })
                .collect();
            panic!(
                "{open} open transactions on the primary after {limit:?}, expected {want}:\n{}",
                activity.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_leaves_nothing_open() {
    let env = Env::start(1, "");
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let client = env.app_client().await;
        exec(&client, "CREATE TABLE k (id int)").await;
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;

        // psql, SIGKILLed while its transaction is open.
        let mut psql = Command::new(pg_bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &addr.port().to_string(), "-U", "app", "-d", "app"])
            .env("PGPASSWORD", "app-secret")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let mut stdin = psql.stdin.take().unwrap();
        stdin.write_all(b"BEGIN;\nINSERT INTO k VALUES (1);\n").unwrap();
        stdin.flush().unwrap();
        wait_open_transactions(&direct, 1, Duration::from_secs(10)).await;
        psql.kill().expect("kill -9 psql");
        psql.wait().unwrap();
        drop(stdin);
        let took = wait_open_transactions(&direct, 0, Duration::from_secs(3)).await;
        eprintln!("transaction of the killed psql was gone after {took:?}");

        // tokio-postgres whose connection task is aborted: the socket closes, no Terminate.
        let (victim, task) = try_connect_with_handle(addr, "app", "app-secret", "app")
            .await
            .expect("connect");
        exec(&victim, "BEGIN").await;
        victim
            .execute("INSERT INTO k VALUES ($1)", &[&2i32])
            .await
            .unwrap_or_else(|e| panic!("INSERT: {}", describe(&e)));
        wait_open_transactions(&direct, 1, Duration::from_secs(5)).await;
        task.abort();
        drop(victim);
        let took = wait_open_transactions(&direct, 0, Duration::from_secs(3)).await;
        eprintln!("transaction of the aborted client was gone after {took:?}");

        let rows: i64 = direct
            .query_one("SELECT count(*) FROM k", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0, "the killed clients' inserts were committed");

        // The pool still serves everyone else.
        exec(&client, "INSERT INTO k VALUES (3)").await;
        assert_eq!(
            simple_column(&client, "/* sluice: primary */ SELECT count(*) FROM k").await,
            ["1"]
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A finished transaction leaves the client's backend parked: its next transaction reuses it
/// without a pool checkout, and another client needing the pool's only connection gets it at
/// once rather than after checkout_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_backend_is_reused_and_handed_over_on_demand() {
    let env = Env::start(
        1,
        "pool_size = 1\ncheckout_timeout = \"5s\"\nconsistency = \"primary\"",
    );
    let checkouts = || {
        env.sluice
            .metric("sluice_checkout_wait_seconds_count{cluster=\"app\"}")
            .expect("checkout count")
    };
    bounded(60, async {
        let a = env.app_client().await;
        let b = env.app_client().await;
        let first = simple_column(&a, "SELECT pg_backend_pid()").await;
        let before = checkouts();
        for _ in 0..20 {
            assert_eq!(simple_column(&a, "SELECT pg_backend_pid()").await, first);
        }
        assert_eq!(
            checkouts(),
            before,
            "A's next 20 transactions went through the pool"
        );

        for round in 0..10 {
            let started = Instant::now();
            assert_eq!(simple_column(&b, "SELECT pg_backend_pid()").await, first);
            assert_eq!(simple_column(&a, "SELECT pg_backend_pid()").await, first);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "round {round}: the parked connection was not handed over ({took:?})"
            );
        }

        // Three clients taking turns on one connection as fast as they can: nobody fails.
        let c = env.app_client().await;
        let clients = [a, b, c].map(std::sync::Arc::new);
        let tasks: Vec<_> = clients
            .iter()
            .map(|client| {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0..30 {
                        let got = simple_column(&client, &format!("SELECT {i}")).await;
                        assert_eq!(got, [i.to_string()]);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// The requests in flight on the only node, from /topology.
fn in_flight(env: &Env) -> u64 {
    let (nodes, body) = env.sluice.topology_nodes();
    nodes
        .first()
        .and_then(|n| n["in_flight"].as_u64())
        .unwrap_or_else(|| panic!("no in_flight in {body}"))
}

/// A client slow to read the end of its result does not keep the backend of its finished
/// transaction from another client that needs it: sluice parks the backend once the server's
/// ReadyForQuery is in, while it is still writing the last of the result to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_keep_its_parked_backend_from_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ROWS: usize = 8000;
    let env = Env::start(
        0,
        "pool_size = 1\ncheckout_timeout = \"2s\"\nconsistency = \"primary\"",
    );
    bounded(60, async {
        let total = ROWS * 1011;
        let mut chunk = vec![0u8; 4096];
        // How much of the answer the kernel's socket buffers hold while sluice's writes wait
        // varies (a loaded machine has seen it take nearly all of it before sluice read the
        // server's last byte): up to 3 attempts, each on a new connection, to get the case
        // this test is about.
        let mut attempt = 0;
        let (mut slow, mut got) = loop {
            attempt += 1;
            // A small receive buffer: what sluice cannot write stays in its own buffers.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let stream = socket.connect(env.sluice.listen_addr()).await.expect("connect");
            let mut slow = crate::raw::raw_login_on(stream).await;
            let mut query = bytes::BytesMut::new();
            let sql = format!("SELECT repeat('x', 1000) FROM generate_series(1, {ROWS})");
            postgres_protocol::message::frontend::query(&sql, &mut query).unwrap();
            slow.write_all(&query).await.unwrap();
            // ~8 MB, read slowly until sluice has the server's whole answer (nothing in flight
            // on the node any more); the socket buffers still hold megabytes of it.
            let mut got = Vec::new();
            loop {
                let n = slow.read(&mut chunk).await.expect("slow read");
                assert!(n > 0, "EOF");
                got.extend_from_slice(&chunk[..n]);
                // Checked after a read: the answer has begun, so the request did start.
                if in_flight(&env) == 0 {
                    break;
                }
            }
            eprintln!(
                "slow reader (attempt {attempt}): {} of ~{total} bytes read when sluice had the answer",
                got.len()
            );
            if got.len() + 256 * 1024 < total {
                break (slow, got);
            }
            assert!(
                attempt < 3,
                "read {} of ~{total} bytes before sluice had the answer in {attempt} attempts: nothing left to test",
                got.len()
            );
            // This connection closes here (its backend, mid-answer, is not reused).
        };

        let b = env.app_client().await;
        let started = Instant::now();
        assert_eq!(simple_column(&b, "SELECT 1").await, ["1"]);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "B waited {took:?} for the backend the slow reader had finished with"
        );

        // The slow reader still gets all of its result.
        while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            let n = slow.read(&mut chunk).await.expect("rest of the result");
            assert!(n > 0, "EOF before the end of the result");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got.len() > total, "{} bytes", got.len());
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Server connections of user `app` to database `app`, as the primary reports them.
async fn app_backends(direct: &Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Server connections of pool (app, app) in SHOW POOLS: sv_active + sv_idle + sv_login.
async fn pooled_servers(console: &Client) -> usize {
    let pools = crate::console::show(console, "SHOW POOLS").await;
    ["sv_active", "sv_idle", "sv_login"]
        .iter()
        .map(|column| {
            crate::console::cell(&pools, "database", "app", column)
                .unwrap_or_else(|| panic!("no {column} for app in {pools:?}"))
                .parse::<usize>()
                .expect("a count")
        })
        .sum()
}

/// `pool_size` bounds a pool over all cores: with two runtime threads and pool_size 2 (a share
/// of one per core), twelve clients accepted on either core never have more than two server
/// connections (SHOW POOLS and pg_stat_activity, polled throughout); a client whose core's
/// share is held by an open transaction is served by the other core's capacity, i.e. by the
/// one connection left, which moves to its core without being reopened (same server pid for
/// every client); and clients all running at once never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_bounds_connections_over_all_cores() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let cluster = crate::support::PgCluster::start(0);
    let (toml, _, _) = crate::support::sluice_config(
        &cluster,
        "pool_size = 2\ncheckout_timeout = \"3s\"\nconsistency = \"primary\"",
    );
    let toml = format!(
        "[runtime]\nthreads = 2\n\n{}\n[[clusters.users]]\nname = \"boss\"\npassword = \"boss-secret\"\n",
        toml.replacen("[admin]\n", "[admin]\nadmin_users = [\"boss\"]\n", 1)
    );
    let sluice = crate::support::Sluice::start(&toml);
    crate::wait_all_probed(&sluice, 1);
    let env = Env { sluice, cluster };
    let addr = env.sluice.listen_addr();
    bounded(120, async {
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let console = crate::support::connect(addr, "boss", "boss-secret", "sluice").await;
        let mut clients = Vec::new();
        for _ in 0..12 {
            let c = env.app_client().await;
            simple_column(&c, "SELECT 1").await;
            clients.push(Arc::new(c));
        }
        // The function catalog is read on a connection of its own at the first login: gone
        // before the bound is watched.
        while app_backends(&direct).await > 2 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }

        // Polls both views until told to stop; returns the most connections either showed.
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (stop, most) = (stop.clone(), most.clone());
            tokio::spawn(async move {
                let mut polls = 0;
                while !stop.load(Ordering::SeqCst) || polls < 2 {
                    let shown = pooled_servers(&console)
                        .await
                        .max(app_backends(&direct).await as usize);
                    most.fetch_max(shown, Ordering::SeqCst);
                    polls += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                polls
            })
        };

        // One client holds a connection in an open transaction: every other client, on
        // either core, has to be served by the one connection left.
        let holder = &clients[0];
        exec(holder, "BEGIN").await;
        let held = simple_column(holder, "SELECT pg_backend_pid()").await;
        let mut pids = BTreeSet::new();
        for _round in 0..3 {
            for c in &clients[1..] {
                // Fails with 53300 after checkout_timeout if the capacity does not reach it.
                pids.extend(simple_column(c, "SELECT pg_backend_pid()").await);
            }
        }
        assert_eq!(
            pids.len(),
            1,
            "the other clients were served by {pids:?} (the holder has {held:?})"
        );
        assert!(
            !pids.contains(&held[0]),
            "the holder's connection served others: {pids:?}"
        );
        exec(holder, "COMMIT").await;

        // Everyone at once.
        let tasks: Vec<_> = clients
            .iter()
            .map(|client| {
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        let sql = format!("SELECT {i}");
                        match client.simple_query(&sql).await {
                            Ok(_) => {}
                            Err(e) => panic!("{sql}: {}", describe(&e)),
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
        stop.store(true, Ordering::SeqCst);
        let polls = watcher.await.expect("watcher");
        let most = most.load(Ordering::SeqCst);
        eprintln!("at most {most} server connections in {polls} polls");
        assert!(most <= 2, "{most} server connections with pool_size 2");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// Two checkouts that wait at the same time each get a parked connection: each claims a
/// different one of the two that idle clients keep parked. Both open a transaction, so each
/// needs a connection of its own at once: a connection claimed twice would leave the other
/// checkout waiting while a connection sits parked, until the reaper's next pass (every 10 s
/// with the default `idle_timeout`) happened to wake its holder, or until `checkout_timeout`
/// (3 s here: 53300) failed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_checkouts_each_claim_a_different_parked_connection() {
    let env = Env::start(
        0,
        "pool_size = 2\ncheckout_timeout = \"3s\"\nconsistency = \"primary\"",
    );
    bounded(120, async {
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let clients = [
            env.app_client().await,
            env.app_client().await,
            env.app_client().await,
            env.app_client().await,
        ];
        // Clients 0 and 1, then 2 and 3, then 0 and 1 again...: each pair opens transactions
        // at once while the other pair keeps both connections parked.
        for round in 0..24 {
            let (x, y) = (&clients[2 * (round % 2)], &clients[2 * (round % 2) + 1]);
            let sql = "BEGIN; SELECT pg_backend_pid()";
            let (px, py) = tokio::join!(simple_column(x, sql), simple_column(y, sql));
            assert_ne!(
                px[0], py[0],
                "round {round}: two open transactions on one connection"
            );
            exec(x, "COMMIT").await;
            exec(y, "COMMIT").await;
            if round == 0 {
                // The function catalog's connection of the first login goes first: from now
                // on the pool holds the two parked connections and nothing else.
                while app_backends(&direct).await > 2 {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
        assert!(app_backends(&direct).await <= 2);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// `idle_timeout` applies to a parked connection too: the reaper asks its session, which
/// gives it back to be closed, while the client stays connected and runs its next query on a
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_idle_past_idle_timeout_is_closed() {
    let env = Env::start(0, "idle_timeout = \"400ms\"\nconsistency = \"primary\"");
    bounded(60, async {
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let a = env.app_client().await;
        let first = simple_column(&a, "SELECT pg_backend_pid()").await;
        // Parked with A until the reaper finds it idle past 400 ms.
        while app_backends(&direct).await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next = simple_column(&a, "SELECT pg_backend_pid()").await;
        assert_ne!(next, first, "the expired connection served again");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
