//! Real drivers configured round-robin (not token-aware): the DataStax Python driver from PyPI
//! and the scylla Rust driver. Through sluice every routable request is coordinated by a
//! replica; straight to the cluster, about RF/N of them are.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::batch::Batch;

use crate::support::bounded;
use crate::{replica_hits, user_records, Env};

const NODES: usize = 5;
const RF: usize = 2;

const PYTHON_WORKLOAD: &str = r#"
import sys
from cassandra.cluster import Cluster, ExecutionProfile, EXEC_PROFILE_DEFAULT
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement

host, port, version, ks, n, rf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
cluster = Cluster([host], port=port, protocol_version=version,
                  execution_profiles={EXEC_PROFILE_DEFAULT: profile})
s = cluster.connect()
s.execute("CREATE KEYSPACE %s WITH replication = {'class': 'SimpleStrategy', 'replication_factor': %s}" % (ks, rf))
s.set_keyspace(ks)
s.execute("CREATE TABLE kv (k text PRIMARY KEY, v int)")
s.execute("CREATE TABLE ev (tenant text, bucket int, seq int, note text, PRIMARY KEY ((tenant, bucket), seq))")
ins = s.prepare("INSERT INTO kv (k, v) VALUES (?, ?)")
sel = s.prepare("SELECT v FROM kv WHERE k = ?")
ev = s.prepare("INSERT INTO ev (tenant, bucket, seq, note) VALUES (?, ?, ?, ?)")
for i in range(n):
    k = "key%d" % i
    s.execute(ins, (k, i))
    s.execute("INSERT INTO kv (k, v) VALUES ('lit%d', %d)" % (i, i))
    s.execute("UPDATE kv SET v = %s WHERE k = %s", (i + 1, k))
    assert s.execute(sel, (k,)).one().v == i + 1
    s.execute(ev, ("t%d" % (i % 5), i % 3, i, "x"))
    rows = list(s.execute("SELECT seq FROM ev WHERE tenant = %s AND bucket = %s", ("t%d" % (i % 5), i % 3)))
    assert len(rows) >= 1
    b = BatchStatement()
    b.add(ins, ("b%d" % i, 1))
    b.add(ins, ("b%d" % i, 2))
    s.execute(b)
    assert s.execute("INSERT INTO kv (k, v) VALUES ('lwt%d', 1) IF NOT EXISTS" % i).was_applied
    s.execute("DELETE FROM kv WHERE k = 'lit%d'" % i)
cluster.shutdown()
print("ok")
"#;

/// Runs the Python workload against `addr`; panics with its output if it fails.
fn python(addr: SocketAddr, version: u8, ks: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("workload.py");
    std::fs::write(&script, PYTHON_WORKLOAD).unwrap();
    let check = Command::new("python3").args(["-c", "import cassandra"]).output();
    if !check.is_ok_and(|o| o.status.success()) {
        panic!("the Python cassandra-driver is missing: `pip install cassandra-driver` (.ci/run does)");
    }
    let mut child = Command::new("python3")
        .arg(&script)
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            version.to_string(),
            ks.into(),
            n.to_string(),
            RF.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Python workload did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python workload failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_driver_round_robin_through_sluice_hits_replicas_only() {
    let env = Env::start(NODES, "", "");
    let n = 25;
    for version in [4u8, 5] {
        let ks = format!("py_v{version}");
        python(env.addr(), version, &ks, n);
        let records = user_records(&env.cluster, &ks);
        let (hits, routable) = replica_hits(&records);
        eprintln!("python v{version} through sluice: {hits}/{routable} coordinated by a replica");
        assert!(routable >= 9 * n, "{routable}");
        assert_eq!(hits, routable);
        assert!(records
            .iter()
            .filter(|r| r.lwt)
            .all(|r| r.replicas.first() == Some(&r.node)));
    }
    // The same driver and workload straight to the cluster: round-robin over every node.
    let direct = env.cluster.address(0);
    python(direct, 4, "py_direct", n);
    let (hits, routable) = replica_hits(&user_records(&env.cluster, "py_direct"));
    let ratio = hits as f64 / routable as f64;
    eprintln!(
        "python v4 without sluice: {hits}/{routable} = {:.0}% coordinated by a replica (RF/N = {:.0}%)",
        ratio * 100.0,
        RF as f64 / NODES as f64 * 100.0
    );
    assert!(
        ratio < 0.8,
        "round-robin without sluice should miss replicas often: {ratio}"
    );
    env.sluice.assert_no_unexpected_errors(&[]);
}

async fn scylla_session(addr: SocketAddr) -> Session {
    let policy = DefaultPolicy::builder().token_aware(false).build();
    let profile = ExecutionProfile::builder().load_balancing_policy(policy).build();
    SessionBuilder::new()
        .known_node_addr(addr)
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .expect("scylla session")
}

async fn scylla_workload(session: &Session, ks: &str, n: i32) {
    session
        .query_unpaged(
            format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': {RF}}}"),
            &[],
        )
        .await
        .unwrap();
    session
        .query_unpaged(format!("CREATE TABLE {ks}.kv (k text PRIMARY KEY, v int)"), &[])
        .await
        .unwrap();
    session.await_schema_agreement().await.unwrap();
    let ins = session
        .prepare(format!("INSERT INTO {ks}.kv (k, v) VALUES (?, ?)"))
        .await
        .unwrap();
    let sel = session
        .prepare(format!("SELECT v FROM {ks}.kv WHERE k = ?"))
        .await
        .unwrap();
    for i in 0..n {
        let k = format!("key{i}");
        session.execute_unpaged(&ins, (k.as_str(), i)).await.unwrap();
        let rows = session
            .execute_unpaged(&sel, (k.as_str(),))
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        let (v,): (i32,) = rows.single_row().unwrap();
        assert_eq!(v, i);
        session
            .query_unpaged(format!("UPDATE {ks}.kv SET v = ? WHERE k = 'lit{i}'"), (i,))
            .await
            .unwrap();
        let mut batch = Batch::default();
        batch.append_statement(ins.clone());
        batch.append_statement(ins.clone());
        session
            .batch(&batch, ((k.as_str(), 1), (k.as_str(), 2)))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_driver_round_robin_through_sluice_hits_replicas_only() {
    let env = Env::start(NODES, "", "");
    let n = 40;
    bounded(120, async {
        let through = scylla_session(env.addr()).await;
        scylla_workload(&through, "sc_sluice", n).await;
        let (hits, routable) = replica_hits(&user_records(&env.cluster, "sc_sluice"));
        eprintln!("scylla driver through sluice: {hits}/{routable} coordinated by a replica");
        assert_eq!(routable, 4 * n as usize);
        assert_eq!(hits, routable);

        let direct = scylla_session(env.cluster.address(0)).await;
        scylla_workload(&direct, "sc_direct", n).await;
        let (hits, routable) = replica_hits(&user_records(&env.cluster, "sc_direct"));
        let ratio = hits as f64 / routable as f64;
        eprintln!(
            "scylla driver without sluice: {hits}/{routable} = {:.0}% coordinated by a replica",
            ratio * 100.0
        );
        assert!(ratio < 0.8, "{ratio}");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
