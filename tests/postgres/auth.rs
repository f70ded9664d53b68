//! Client authentication to sluice, and sluice's authentication to backends (SCRAM, md5,
//! trust).

use tokio_postgres::error::SqlState;

use crate::support::{bounded, connect, simple_column, try_connect};
use crate::Env;

const MORE_USERS: &str = r#"
[[clusters.users]]
name = "legacy"
password = "legacy-secret"

[[clusters.users]]
name = "postgres"
password = "pw"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_28p01() {
    let env = Env::start_with(1, "", MORE_USERS);
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        for (user, password) in [("app", "wrong"), ("nobody", "app-secret"), ("legacy", "")] {
            let Err(err) = try_connect(addr, user, password, "app").await else {
                panic!("{user}/{password:?} was let in");
            };
            assert_eq!(
                err.code(),
                Some(&SqlState::INVALID_PASSWORD),
                "{user}/{password:?}: {err:?}"
            );
        }
        // Failed logins do not disturb good ones.
        let client = env.app_client().await;
        assert_eq!(simple_column(&client, "SELECT current_user").await, ["app"]);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_trust_backends_work() {
    let env = Env::start_with(1, "", MORE_USERS);
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        // legacy: the backends ask sluice for md5.
        let legacy = connect(addr, "legacy", "legacy-secret", "app").await;
        assert_eq!(simple_column(&legacy, "SELECT current_user").await, ["legacy"]);
        let row = legacy
            .query_one("SELECT current_user::text, pg_is_in_recovery()", &[])
            .await
            .expect("extended read as legacy");
        assert_eq!(row.get::<_, String>(0), "legacy");
        assert_eq!(
            simple_column(
                &legacy,
                "CREATE TABLE l (x int); INSERT INTO l VALUES (7); SELECT 1"
            )
            .await,
            ["1"]
        );

        // postgres: the backends trust it; clients still authenticate to sluice.
        let su = connect(addr, "postgres", "pw", "app").await;
        assert_eq!(simple_column(&su, "SELECT current_user").await, ["postgres"]);
        assert_eq!(simple_column(&su, "SELECT x FROM l FOR UPDATE").await, ["7"]);
        let Err(err) = try_connect(addr, "postgres", "not-pw", "app").await else {
            panic!("a trusted backend user still needs sluice's password");
        };
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// `password` as the SCRAM verifier copied from `pg_authid`: clients log in with the real
/// password, and sluice logs in to the servers with the ClientKey recovered from the client's
/// proof (SCRAM pass-through), on every node and for every pooled connection opened later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_scram_verifier_logs_in_by_pass_through() {
    let cluster = crate::support::PgCluster::start(1);
    let verifier = cluster.verifier("app");
    // The probes log in as postgres (trusted): a verifier-only user has no key until a client
    // of it logs in.
    let (toml, _, _) = crate::support::sluice_config(&cluster, "probe_user = \"postgres\"\npool_size = 2");
    let toml = toml.replace("password = \"app-secret\"", &format!("password = \"{verifier}\""))
        + "\n[[clusters.users]]\nname = \"postgres\"\npassword = \"pw\"\n";
    assert!(!toml.contains("app-secret"));
    let sluice = crate::support::Sluice::start(&toml);
    crate::wait_all_probed(&sluice, 2);
    let env = Env { sluice, cluster };
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let Err(err) = try_connect(addr, "app", "wrong", "app").await else {
            panic!("a wrong password was let in");
        };
        assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");

        let client = env.app_client().await;
        assert_eq!(simple_column(&client, "SELECT current_user").await, ["app"]);
        // A write on the primary and reads on the replica: connections to both nodes.
        crate::support::exec(&client, "CREATE TABLE pt (x int); INSERT INTO pt VALUES (1)").await;
        env.cluster.wait_replicated().await;
        let (on_replica, _) = crate::where_simple(&client, "").await;
        assert!(on_replica, "reads go to the replica");
        // Several clients at once: more pooled connections, opened with the remembered key.
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(env.app_client().await);
        }
        let runs = clients.iter().map(|c| async move {
            crate::support::exec(
                c,
                "BEGIN; INSERT INTO pt VALUES (2); SELECT pg_sleep(0.1); COMMIT",
            )
            .await
        });
        futures_util::future::join_all(runs).await;
        let n = simple_column(&client, "/* sluice: primary */ SELECT count(*) FROM pt").await;
        assert_eq!(n, ["5"]);
    })
    .await;
    // psql (libpq) logs in the same way.
    let port = env.sluice.listen_addr().port();
    let out = crate::support::psql_as(port, "app", "app-secret", "app", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "app\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = env.sluice.logs().join("\n");
    assert!(
        !logs.contains(&verifier[verifier.len() - 20..]),
        "a key reached the logs"
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// A verifier-only user is also the probe user: until a client of it logs in, sluice has no key
/// and says so (node errors in /topology); the first client login brings the nodes up and is
/// served (its login waits up to `failover_wait` for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_a_verifier_only_user_start_with_the_first_client_login() {
    let cluster = crate::support::PgCluster::start(0);
    let verifier = cluster.verifier("app");
    let (toml, _, _) = crate::support::sluice_config(&cluster, "probe_interval = \"200ms\"");
    let toml = toml.replace("password = \"app-secret\"", &format!("password = \"{verifier}\""));
    let sluice = crate::support::Sluice::spawn_with_env(&toml, &[]);
    bounded(60, async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let body = crate::support::http_get(sluice.admin_addr(), "/topology")
                .map(|r| r.1)
                .unwrap_or_default();
            if body.contains("no client has logged in as") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no pass-through error shown: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let client = connect(sluice.listen_addr(), "app", "app-secret", "app").await;
        assert_eq!(simple_column(&client, "SELECT current_user").await, ["app"]);
        crate::wait_all_probed(&sluice, 1);
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
    drop(sluice);
    drop(cluster);
}

/// `password` may be the md5 hash `pg_authid` holds for an md5 role: clients prove the password
/// to sluice with md5 (a fresh salt per login), and sluice answers the server's md5 challenge
/// with the hash. A server that asks such a user for SCRAM gets no answer sluice could give: the
/// login fails with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_md5_hash_logs_in_with_md5_both_ways() {
    let cluster = crate::support::PgCluster::start(1);
    // `legacy` is md5 in pg_authid and md5 in pg_hba.conf; `oldmd5` is md5 in pg_authid but
    // pg_hba.conf asks it for scram-sha-256 (which PostgreSQL itself cannot then satisfy).
    cluster.psql(
        cluster.primary_port(),
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE oldmd5 LOGIN PASSWORD 'oldmd5-secret'",
    );
    let hash = |role: &str| {
        cluster
            .psql(
                cluster.primary_port(),
                "postgres",
                &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"),
            )
            .trim()
            .to_string()
    };
    let (legacy, oldmd5) = (hash("legacy"), hash("oldmd5"));
    assert!(legacy.starts_with("md5") && legacy.len() == 35, "{legacy}");
    let (toml, _, _) = crate::support::sluice_config(&cluster, "");
    let toml = format!(
        "{toml}\n[[clusters.users]]\nname = \"legacy\"\npassword = \"{legacy}\"\n\
         \n[[clusters.users]]\nname = \"oldmd5\"\npassword = \"{oldmd5}\"\n"
    );
    let sluice = crate::support::Sluice::start(&toml);
    crate::wait_all_probed(&sluice, 2);
    let env = Env { sluice, cluster };
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let client = connect(addr, "legacy", "legacy-secret", "app").await;
        assert_eq!(simple_column(&client, "SELECT session_user").await, ["legacy"]);
        // A write on the primary and a read on the replica: md5 towards both nodes.
        crate::support::exec(&client, "CREATE TABLE m5 (x int); INSERT INTO m5 VALUES (5)").await;
        env.cluster.wait_replicated().await;
        let (on_replica, _) = crate::where_simple(&client, "").await;
        assert!(on_replica, "reads go to the replica");
        for (user, password) in [("legacy", "wrong"), ("legacy", "")] {
            let Err(err) = try_connect(addr, user, password, "app").await else {
                panic!("{user}/{password:?} was let in");
            };
            assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
        }
        // The server wants SCRAM from oldmd5: only its password could answer that.
        let Err(err) = try_connect(addr, "oldmd5", "oldmd5-secret", "app").await else {
            panic!("oldmd5 logged in although the server asks it for SCRAM");
        };
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
        assert!(
            db.message().contains("md5 hash") && db.message().contains("SCRAM-SHA-256"),
            "{}",
            db.message()
        );
    })
    .await;
    // psql (libpq) answers sluice's md5 challenge too.
    let out = crate::support::psql_as(addr.port(), "legacy", "legacy-secret", "app", "SELECT 42");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "42\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}
