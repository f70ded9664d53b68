//! Token-aware routing through sluice, checked against the test cluster's records: every
//! request with a routable partition key is coordinated by one of its replicas.

use sluice_cql::request::{Batch, BatchStatement, BatchTarget};
use sluice_cql::response::ResultBody;
use sluice_cql::wire::Value;
use sluice_cql::{Compression, Request, Response};

use crate::client::{execute, int, query, text, Client};
use crate::support::bounded;
use crate::{replica_hits, user_records, Env};

async fn schema(c: &mut Client, ks: &str, rf: usize) {
    c.ok(&format!(
        "CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"
    ))
    .await;
    c.ok(&format!("USE {ks}")).await;
    c.ok("CREATE TABLE kv (k text PRIMARY KEY, v int)").await;
    c.ok(
        "CREATE TABLE ev (tenant text, bucket int, seq int, note text, PRIMARY KEY ((tenant, bucket), seq))",
    )
    .await;
}

/// Every kind of routable request, `n` times each.
async fn workload(c: &mut Client, n: i32) {
    let ins = c.prepare("INSERT INTO kv (k, v) VALUES (?, ?)").await;
    let sel = c.prepare("SELECT v FROM kv WHERE k = ?").await;
    let ev = c
        .prepare("INSERT INTO ev (tenant, bucket, seq, note) VALUES (?, ?, ?, ?)")
        .await;
    assert_eq!(ins.metadata.pk_indexes, [0]);
    assert_eq!(ev.metadata.pk_indexes, [0, 1]);
    for i in 0..n {
        let k = format!("key{i}");
        assert!(matches!(
            c.execute(&ins, vec![text(&k), int(i)]).await,
            Response::Result(ResultBody::Void)
        ));
        c.ok(&format!("INSERT INTO kv (k, v) VALUES ('lit{i}', {i})"))
            .await;
        c.ok(&format!("UPDATE kv SET v = {} WHERE k = '{k}'", i + 1))
            .await;
        let rows = match c.execute(&sel, vec![text(&k)]).await {
            Response::Result(ResultBody::Rows(r)) => r.rows().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(rows, vec![vec![Some(int(i + 1))]]);
        c.execute(
            &ev,
            vec![text(&format!("t{}", i % 5)), int(i % 3), int(i), text("x")],
        )
        .await;
        // Bound values in a QUERY, composite key.
        let r = c
            .call(query(
                "SELECT seq FROM ev WHERE tenant = ? AND bucket = ?",
                vec![text(&format!("t{}", i % 5)), int(i % 3)],
            ))
            .await;
        assert!(matches!(r, Response::Result(ResultBody::Rows(_))), "{r:?}");
        // A batch within one partition: a prepared and a simple statement.
        let batch = Request::Batch(Batch {
            kind: 0,
            statements: vec![
                BatchStatement {
                    target: BatchTarget::Prepared(ins.id.clone()),
                    values: vec![Value::Set(text(&format!("b{i}"))), Value::Set(int(1))],
                    names: None,
                },
                BatchStatement {
                    target: BatchTarget::Query(format!("UPDATE kv SET v = 2 WHERE k = 'b{i}'")),
                    values: vec![],
                    names: None,
                },
            ],
            consistency: 1,
            flags: 0,
            serial_consistency: None,
            timestamp: None,
            keyspace: None,
            now_in_seconds: None,
        });
        assert!(matches!(c.call(batch).await, Response::Result(ResultBody::Void)));
        // Lightweight transactions.
        let r = c
            .rows(&format!(
                "INSERT INTO kv (k, v) VALUES ('lwt{i}', 1) IF NOT EXISTS"
            ))
            .await;
        assert_eq!(r.rows().unwrap()[0][0].as_deref(), Some(&[1u8][..]), "applied");
        c.rows(&format!("UPDATE kv SET v = 2 WHERE k = 'lwt{i}' IF v = 1"))
            .await;
        c.ok(&format!("DELETE FROM kv WHERE k = 'lit{i}'")).await;
    }
}

async fn check(version: u8, compression: Compression) {
    let env = Env::start(5, "", "");
    bounded(60, async {
        let mut c = Client::connect(env.addr(), version, compression).await;
        let ks = format!("routing_v{version}");
        schema(&mut c, &ks, 2).await;
        env.cluster.clear_records();
        workload(&mut c, 20).await;
        let records = user_records(&env.cluster, &ks);
        let (hits, routable) = replica_hits(&records);
        eprintln!("v{version} {compression:?}: {hits}/{routable} requests coordinated by a replica");
        assert_eq!(
            routable,
            20 * 10,
            "every request but the PREPAREs addresses one partition"
        );
        assert_eq!(
            hits,
            routable,
            "{:#?}",
            records
                .iter()
                .filter(|r| r.coordinator_is_replica() == Some(false))
                .collect::<Vec<_>>()
        );
        for r in records.iter().filter(|r| r.lwt) {
            assert_eq!(
                Some(&r.node),
                r.replicas.first(),
                "LWT on the first replica: {r:?}"
            );
        }
        assert!(records.iter().all(|r| r.error.is_none()), "{records:#?}");
        // The same traffic in /metrics: routed by partition, and the connected client.
        let sluice = &env.sluice;
        let replica = sluice.metric("sluice_queries_total{cluster=\"ring\",route=\"replica\"}");
        assert!(replica.is_some_and(|n| n >= (20 * 10) as f64), "{replica:?}");
        assert_eq!(sluice.metric("sluice_clients{cluster=\"ring\"}"), Some(1.0));
        let healthy = sluice.metric(&format!(
            "sluice_node_healthy{{cluster=\"ring\",node=\"{}\"}}",
            env.cluster.address(records[0].node)
        ));
        assert_eq!(healthy, Some(1.0));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routable_request_reaches_a_replica_v4() {
    check(4, Compression::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routable_request_reaches_a_replica_v5_lz4() {
    check(5, Compression::Lz4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routable_request_reaches_a_replica_v4_snappy() {
    check(4, Compression::Snappy).await;
}

/// NetworkTopologyStrategy with racks, and the local data center first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_topology_prefers_local_datacenter_replicas() {
    let spec = sluice_cql_testcluster::ClusterSpec::new(6, 8)
        .with_location(0, "dc1", "r1")
        .with_location(1, "dc1", "r2")
        .with_location(2, "dc1", "r1")
        .with_location(3, "dc2", "r1")
        .with_location(4, "dc2", "r2")
        .with_location(5, "dc2", "r1");
    let env = Env::with_spec(spec, "", "[clusters.cql]\nlocal_datacenter = \"dc2\"\n");
    bounded(60, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        c.ok(
            "CREATE KEYSPACE nts WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 2, 'dc2': 2}",
        )
        .await;
        c.ok("CREATE TABLE nts.kv (k text PRIMARY KEY, v int)").await;
        env.cluster.clear_records();
        let ins = c.prepare("INSERT INTO nts.kv (k, v) VALUES (?, ?)").await;
        let reqs = (0..200)
            .map(|i| execute(&ins, vec![text(&format!("k{i}")), int(i)]))
            .collect();
        for r in c.pipeline(reqs).await {
            assert!(matches!(r, Response::Result(ResultBody::Void)), "{r:?}");
        }
        let records = user_records(&env.cluster, "nts");
        let (hits, routable) = replica_hits(&records);
        assert_eq!((hits, routable), (200, 200));
        // Every partition has two replicas in dc2 (one per rack): the coordinator is one of them.
        for r in &records {
            assert!(r.node >= 3, "coordinated outside the local data center: {r:?}");
            let dc2: Vec<_> = r.replicas.iter().filter(|&&n| n >= 3).collect();
            assert_eq!(dc2.len(), 2, "{r:?}");
        }
    })
    .await;
}

/// Thousands of requests in flight from a few clients share a few backend connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_requests_share_few_connections() {
    let env = Env::start(
        3,
        "",
        "[clusters.cql]\nconnections_per_node = 2\n\n[runtime]\nthreads = 2\n",
    );
    bounded(90, async {
        let mut c = Client::connect(env.addr(), 5, Compression::None).await;
        schema(&mut c, "many", 1).await;
        let ins = c.prepare("INSERT INTO kv (k, v) VALUES (?, ?)").await;
        let mut tasks = Vec::new();
        for client in 0..4 {
            let addr = env.addr();
            let ins = ins.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(addr, 5, Compression::None).await;
                let reqs = (0..2000)
                    .map(|i| execute(&ins, vec![text(&format!("c{client}-{i}")), int(i)]))
                    .collect();
                let out = c.pipeline(reqs).await;
                assert!(out
                    .iter()
                    .all(|r| matches!(r, Response::Result(ResultBody::Void))));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rows = c.rows("SELECT count(*) FROM kv").await;
        assert_eq!(
            rows.rows().unwrap()[0][0].as_deref(),
            Some(&8000i64.to_be_bytes()[..])
        );
        let (_, topo) = env.sluice.http_get("/topology");
        let topo: serde_json::Value = serde_json::from_str(&topo).unwrap();
        for n in topo["clusters"][0]["nodes"].as_array().unwrap() {
            // One key (v5, keyspace "many", no user) per node, plus the no-keyspace one, on
            // each of sluice's two threads.
            assert!(n["open_connections"].as_u64().unwrap() <= 8, "{n}");
        }
    })
    .await;
}
