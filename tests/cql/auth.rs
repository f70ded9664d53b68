//! PasswordAuthenticator: clients' credentials pass through to the cluster, or sluice logs in
//! with configured credentials.

use sluice_cql::frame::Opcode;
use sluice_cql::response::error_code;
use sluice_cql::{Compression, Request, Response};
use sluice_cql_testcluster::ClusterSpec;

use crate::client::{error_of, Client};
use crate::support::bounded;
use crate::Env;

fn plain(user: &str, password: &str) -> Request {
    Request::AuthResponse(Some(format!("\0{user}\0{password}").into_bytes().into()))
}

/// STARTUP, expecting AUTHENTICATE.
async fn startup(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::raw(addr).await;
    c.version = 4;
    let r = c
        .call(Request::Startup(vec![("CQL_VERSION".into(), "3.0.0".into())]))
        .await;
    assert!(
        matches!(&r, Response::Authenticate(a) if a.contains("PasswordAuthenticator")),
        "{r:?}"
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_pass_through() {
    let env = Env::with_spec(
        ClusterSpec::new(3, 8).with_credentials("cassandra", "s3cret"),
        "",
        "",
    );
    bounded(60, async {
        let mut bad = startup(env.addr()).await;
        let r = bad.call(plain("cassandra", "wrong")).await;
        assert_eq!(error_of(&r).code, error_code::AUTH_ERROR, "{r:?}");
        // Nothing runs before a successful login.
        let r = bad.query("SELECT * FROM system.local").await;
        assert_eq!(error_of(&r).code, error_code::PROTOCOL_ERROR);

        let mut c = startup(env.addr()).await;
        let r = c.call(plain("cassandra", "s3cret")).await;
        assert_eq!(r.opcode(), Opcode::AuthSuccess, "{r:?}");
        c.ok("CREATE KEYSPACE a WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE a.kv (k text PRIMARY KEY, v int)").await;
        c.ok("INSERT INTO a.kv (k, v) VALUES ('x', 1)").await;
        assert_eq!(c.rows("SELECT v FROM a.kv WHERE k = 'x'").await.rows_count, 1);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_credentials_log_sluice_in() {
    let env = Env::with_spec(
        ClusterSpec::new(3, 8).with_credentials("cassandra", "s3cret"),
        "",
        "[clusters.cql]\nusername = \"cassandra\"\npassword = \"s3cret\"\n",
    );
    bounded(60, async {
        // Clients are not asked to log in; sluice uses its own credentials.
        let mut c = Client::connect(env.addr(), 5, Compression::None).await;
        c.ok("CREATE KEYSPACE b WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("USE b").await;
        c.ok("CREATE TABLE kv (k text PRIMARY KEY, v int)").await;
        c.ok("INSERT INTO kv (k, v) VALUES ('x', 1)").await;
        let (_, topo) = env.sluice.http_get("/topology");
        assert!(topo.contains("\"ring_known\":true"), "{topo}");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_users_log_clients_in_to_sluice_and_a_wrong_password_uses_no_node() {
    // Clients log in to sluice as `app`; sluice logs in to the nodes as `cassandra`.
    let env = Env::with_spec(
        ClusterSpec::new(3, 8).with_credentials("cassandra", "s3cret"),
        "",
        "[clusters.cql]\nusername = \"cassandra\"\npassword = \"s3cret\"\n\n[[clusters.users]]\nname = \"app\"\npassword = \"app-secret\"\n",
    );
    bounded(60, async {
        let accepted = env.cluster.connections_accepted();
        let records = env.cluster.records().len();
        for (user, password) in [("app", "wrong"), ("cassandra", "s3cret"), ("nobody", "")] {
            let mut bad = startup(env.addr()).await;
            let r = bad.call(plain(user, password)).await;
            let e = error_of(&r);
            assert_eq!(e.code, error_code::AUTH_ERROR, "{user}: {r:?}");
            assert!(e.message.contains("incorrect"), "{}", e.message);
            let r = bad.query("SELECT * FROM system_schema.keyspaces").await;
            assert_eq!(error_of(&r).code, error_code::PROTOCOL_ERROR, "{r:?}");
        }
        // A token that is not SASL PLAIN is refused the same way.
        let mut garbled = startup(env.addr()).await;
        let r = garbled
            .call(Request::AuthResponse(Some(bytes::Bytes::from_static(b"no-nul"))))
            .await;
        assert_eq!(error_of(&r).code, error_code::AUTH_ERROR, "{r:?}");
        // None of that reached a node.
        assert_eq!(env.cluster.connections_accepted(), accepted);
        assert_eq!(env.cluster.records().len(), records);
        assert_eq!(
            env.sluice.metric("sluice_auth_failures_total{cluster=\"ring\"}"),
            Some(3.0)
        );

        let mut c = startup(env.addr()).await;
        let r = c.call(plain("app", "app-secret")).await;
        assert_eq!(r.opcode(), Opcode::AuthSuccess, "{r:?}");
        c.ok("CREATE KEYSPACE u WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE u.kv (k text PRIMARY KEY, v int)").await;
        c.ok("INSERT INTO u.kv (k, v) VALUES ('x', 1)").await;
        assert_eq!(c.rows("SELECT v FROM u.kv WHERE k = 'x'").await.rows_count, 1);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

const PYTHON_LOGIN: &str = r#"
import sys
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, NoHostAvailable
host, port = sys.argv[1], int(sys.argv[2])
def session(password):
    c = Cluster([host], port=port, protocol_version=4,
                auth_provider=PlainTextAuthProvider(username="app", password=password))
    return c, c.connect()
try:
    session("wrong")
    sys.exit("a wrong password logged in")
except NoHostAvailable as e:
    assert "AuthenticationFailed" in repr(e) or "incorrect" in repr(e), repr(e)
c, s = session("app-secret")
s.execute("CREATE KEYSPACE py_auth WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
s.execute("CREATE TABLE py_auth.kv (k text PRIMARY KEY, v int)")
s.execute("INSERT INTO py_auth.kv (k, v) VALUES ('a', 1)")
assert s.execute("SELECT v FROM py_auth.kv WHERE k = 'a'").one().v == 1
c.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_drivers_log_in_to_sluice_as_configured_users() {
    let env = Env::with_spec(
        ClusterSpec::new(3, 8).with_credentials("cassandra", "s3cret"),
        "",
        "[clusters.cql]\nusername = \"cassandra\"\npassword = \"s3cret\"\n\n[[clusters.users]]\nname = \"app\"\npassword = \"app-secret\"\n",
    );
    let addr = env.addr();
    bounded(120, async {
        // The scylla Rust driver.
        let login = |password: &'static str| async move {
            scylla::client::session_builder::SessionBuilder::new()
                .known_node_addr(addr)
                .user("app", password)
                .build()
                .await
        };
        let err = login("wrong").await.expect_err("a wrong password is refused");
        assert!(format!("{err:?}").contains("incorrect"), "{err:?}");
        let s = login("app-secret").await.expect("app logs in");
        s.query_unpaged("SELECT release_version FROM system.local", &[])
            .await
            .unwrap();
        s.query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", &[])
            .await
            .unwrap();

        // The DataStax Python driver (PlainTextAuthProvider).
        let out = tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("login.py");
            std::fs::write(&script, PYTHON_LOGIN).unwrap();
            std::process::Command::new("python3")
                .arg(&script)
                .args([addr.ip().to_string(), addr.port().to_string()])
                .output()
                .expect("python3")
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "python login failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
