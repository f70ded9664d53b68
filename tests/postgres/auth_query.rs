//! `auth_user` + `auth_query`: roles created directly in PostgreSQL, not in sluice's
//! configuration, log in through sluice with their own password (verifier looked up, SCRAM
//! pass-through towards the servers).

use tokio_postgres::error::SqlState;

use crate::support::{self, bounded, simple_column, try_connect, PgCluster, Sluice};
use crate::{wait_all_probed, Env};

/// A cluster with roles `dyn1`, `dyn2` (SCRAM) and `oldmd5` (md5) made in PostgreSQL only,
/// behind a sluice that looks roles up as `postgres`; `postgres` is also a console admin.
fn start() -> Env {
    let cluster = PgCluster::start(1);
    cluster.psql_commands(
        cluster.primary_port(),
        "postgres",
        &[
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE dyn1 LOGIN PASSWORD 'dyn1-secret'",
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE dyn2 LOGIN PASSWORD 'dyn2-secret'",
            "SET password_encryption = 'md5'; CREATE ROLE oldmd5 LOGIN PASSWORD 'oldmd5-secret'",
            "GRANT ALL ON DATABASE app TO dyn1, dyn2, oldmd5",
        ],
    );
    cluster.psql(
        cluster.primary_port(),
        "app",
        "GRANT ALL ON SCHEMA public TO dyn1, dyn2",
    );
    let (toml, _, _) = support::sluice_config(&cluster, "auth_user = \"postgres\"");
    let toml = toml.replacen("[admin]\n", "[admin]\nadmin_users = [\"postgres\"]\n", 1)
        + "\n[[clusters.users]]\nname = \"postgres\"\npassword = \"pw\"\n";
    let sluice = Sluice::start(&toml);
    wait_all_probed(&sluice, 2);
    Env { sluice, cluster }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_not_in_the_config_log_in_with_their_database_password() {
    let env = start();
    let addr = env.sluice.listen_addr();
    bounded(60, async {
        let one = support::connect(addr, "dyn1", "dyn1-secret", "app").await;
        let two = support::connect(addr, "dyn2", "dyn2-secret", "app").await;
        // Each runs on server connections of its own role: the server's session_user.
        assert_eq!(simple_column(&one, "SELECT session_user").await, ["dyn1"]);
        assert_eq!(simple_column(&two, "SELECT session_user").await, ["dyn2"]);
        support::exec(&one, "CREATE TABLE d1 (x int); INSERT INTO d1 VALUES (1)").await;
        let row = two
            .query_one("SELECT current_user::text, pg_is_in_recovery()", &[])
            .await
            .expect("extended protocol as dyn2");
        assert_eq!(row.get::<_, String>(0), "dyn2");
        // dyn2 may not read dyn1's table: the server sees dyn2.
        let err = two
            .simple_query("/* sluice: primary */ SELECT * FROM d1")
            .await
            .err()
            .unwrap_or_else(|| panic!("dyn2 read dyn1's table"));
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err:?}");

        // Pools are per real role.
        let admin = support::connect(addr, "postgres", "pw", "sluice").await;
        let pools = admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS");
        let users: Vec<String> = pools
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("app") => {
                    r.get(1).map(String::from)
                }
                _ => None,
            })
            .collect();
        assert!(
            users.contains(&"dyn1".into()) && users.contains(&"dyn2".into()),
            "{users:?}"
        );
        let shown = admin.simple_query("SHOW USERS").await.expect("SHOW USERS");
        let names: Vec<String> = shown
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
                _ => None,
            })
            .collect();
        assert!(names.contains(&"dyn1".into()), "{names:?}");

        // A wrong password (for a SCRAM or an md5 role) and an unknown role are refused alike.
        let mut refusals = Vec::new();
        for (user, password) in [("dyn1", "wrong"), ("nobody", "dyn1-secret"), ("oldmd5", "wrong")] {
            let Err(err) = try_connect(addr, user, password, "app").await else {
                panic!("{user}/{password} was let in");
            };
            let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
            refusals.push((
                db.code().clone(),
                db.severity().to_string(),
                db.message().replace(user, "<user>"),
            ));
        }
        assert_eq!(refusals[0].0, SqlState::INVALID_PASSWORD, "{refusals:?}");
        assert!(refusals.iter().all(|r| *r == refusals[0]), "{refusals:?}");

        // An md5 role (md5 in pg_authid and pg_hba.conf) logs in with md5 both ways; one that
        // the server asks for SCRAM cannot be served from its md5 hash, and is told so.
        let legacy = support::connect(addr, "legacy", "legacy-secret", "app").await;
        assert_eq!(simple_column(&legacy, "SELECT session_user").await, ["legacy"]);
        let Err(err) = try_connect(addr, "oldmd5", "oldmd5-secret", "app").await else {
            panic!("oldmd5 logged in although the server asks it for SCRAM");
        };
        let message = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(message.contains("md5 hash"), "{err:?}");

        // The cached verifier and the remembered key serve new logins and new connections.
        let again = support::connect(addr, "dyn1", "dyn1-secret", "app").await;
        assert_eq!(simple_column(&again, "SELECT count(*) FROM d1").await.len(), 1);
    })
    .await;
    // psql (libpq) as a role sluice never had in its configuration.
    let out = support::psql_as(addr.port(), "dyn2", "dyn2-secret", "app", "SELECT session_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "dyn2\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// psycopg2 (libpq underneath, as most Python applications) logs in through sluice as a role
/// that exists only in PostgreSQL, and is refused with a wrong password as for an unknown role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_found_by_auth_query_logs_in_with_psycopg2() {
    let env = start();
    let port = env.sluice.listen_addr().port();
    const SCRIPT: &str = r#"
import sys
import psycopg2
port = int(sys.argv[1])
def connect(user, password):
    return psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password,
                            dbname="app", connect_timeout=10)
conn = connect("dyn1", "dyn1-secret")
cur = conn.cursor()
cur.execute("SELECT session_user, current_user")
print("row", *cur.fetchone())
cur.execute("CREATE TABLE IF NOT EXISTS py (x int)")
cur.execute("INSERT INTO py VALUES (%s)", (42,))
conn.commit()
cur.execute("/* sluice: primary */ SELECT sum(x) FROM py")
print("sum", cur.fetchone()[0])
conn.close()
for user, password in (("dyn1", "wrong"), ("nobody", "dyn1-secret")):
    try:
        connect(user, password)
        print("let in", user)
    except psycopg2.OperationalError as e:
        print("refused", user, str(e).strip().splitlines()[-1].replace(user, "<user>"))
"#;
    let check = std::process::Command::new("python3")
        .args(["-c", "import psycopg2"])
        .output();
    if !check.is_ok_and(|o| o.status.success()) {
        panic!("psycopg2 is missing: `pip install psycopg2-binary` (.ci/run does)");
    }
    let out = bounded(60, async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(["-c", SCRIPT, &port.to_string()])
                .output()
                .expect("run python3")
        })
        .await
        .unwrap()
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "row dyn1 dyn1", "{stdout}");
    assert_eq!(lines[1], "sum 42", "{stdout}");
    let refused: Vec<&str> = lines[2..].iter().map(|l| l.split_once(' ').unwrap().1).collect();
    assert_eq!(refused.len(), 2, "{stdout}");
    let (wrong, unknown) = (
        refused[0].split_once(' ').unwrap().1,
        refused[1].split_once(' ').unwrap().1,
    );
    assert!(
        lines[2].starts_with("refused dyn1 ") && lines[3].starts_with("refused nobody "),
        "{stdout}"
    );
    assert_eq!(
        wrong, unknown,
        "a wrong password and an unknown role answer alike"
    );
    assert!(wrong.contains("password authentication failed"), "{stdout}");
    env.sluice.assert_no_unexpected_errors(&[]);
}
