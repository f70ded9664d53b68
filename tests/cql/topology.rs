//! What clients see of the topology (sluice itself, at the address they connected to), USE
//! tracking, schema events, the contract configuration, and the admin endpoints.

use std::time::Duration;

use sluice_cql::response::{error_code, Event, ResultBody};
use sluice_cql::{Compression, Request, Response};

use crate::client::{error_of, Client};
use crate::support::{bounded, free_port, Sluice};
use crate::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_tables_show_sluice_not_the_nodes() {
    let env = Env::start(3, "", "");
    bounded(30, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        let local = c
            .rows("SELECT rpc_address, rpc_port, data_center, tokens, partitioner FROM system.local WHERE key='local'")
            .await;
        let row = &local.rows().unwrap()[0];
        assert_eq!(row[0].as_deref(), Some(&[127u8, 0, 0, 1][..]));
        assert_eq!(row[1].as_deref(), Some(&i32::from(env.addr().port()).to_be_bytes()[..]));
        assert_eq!(row[2].as_deref(), Some(&b"datacenter1"[..]));
        let all = c.rows("SELECT * FROM system.local").await;
        assert_eq!(all.metadata.columns.len(), 20);
        for t in ["system.peers", "system.peers_v2"] {
            assert_eq!(c.rows(&format!("SELECT * FROM {t}")).await.rows_count, 0, "{t}");
        }
        // The cluster's own tables pass through.
        let ks = c.rows("SELECT keyspace_name FROM system_schema.keyspaces").await;
        assert!(ks.rows_count >= 2);
        let bad = c.query("SELECT nope FROM system.local").await;
        assert_eq!(error_of(&bad).code, error_code::INVALID);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_is_tracked_per_connection_and_schema_events_reach_clients() {
    let env = Env::start(3, "", "");
    bounded(30, async {
        let mut events = Client::connect(env.addr(), 5, Compression::None).await;
        let r = events.call(Request::Register(vec!["SCHEMA_CHANGE".into()])).await;
        assert_eq!(r, Response::Ready);
        let mut a = Client::connect(env.addr(), 5, Compression::None).await;
        let mut b = Client::connect(env.addr(), 4, Compression::None).await;
        a.ok("CREATE KEYSPACE ks1 WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        a.ok("CREATE KEYSPACE ks2 WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        assert_eq!(a.ok("USE ks1").await, ResultBody::SetKeyspace("ks1".into()));
        assert_eq!(b.ok("USE \"ks2\"").await, ResultBody::SetKeyspace("ks2".into()));
        a.ok("CREATE TABLE t (k int PRIMARY KEY, v text)").await;
        b.ok("CREATE TABLE t (k int PRIMARY KEY, v text)").await;
        a.ok("INSERT INTO t (k, v) VALUES (1, 'in ks1')").await;
        b.ok("INSERT INTO t (k, v) VALUES (1, 'in ks2')").await;
        let ra = a.rows("SELECT v FROM t WHERE k = 1").await.rows().unwrap();
        let rb = b.rows("SELECT v FROM t WHERE k = 1").await.rows().unwrap();
        assert_eq!(ra[0][0].as_deref(), Some(&b"in ks1"[..]));
        assert_eq!(rb[0][0].as_deref(), Some(&b"in ks2"[..]));
        let e = a.query("USE nowhere").await;
        assert_eq!(error_of(&e).code, error_code::INVALID);
        // The registered connection got the schema changes as events.
        events.send(9, &Request::Options).await;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while seen.len() < 4 && tokio::time::Instant::now() < deadline {
            let env = events.recv_any().await;
            if env.header.stream == -1 {
                if let Ok(Response::Event(Event::SchemaChange(sc))) = crate::client::decode(&env) {
                    seen.push(format!("{} {} {}", sc.change, sc.target, sc.keyspace));
                }
            }
        }
        assert!(seen.contains(&"CREATED KEYSPACE ks1".to_string()), "{seen:?}");
        assert!(seen.contains(&"CREATED TABLE ks2".to_string()), "{seen:?}");
    })
    .await;
}

#[test]
fn the_contract_file_runs_unchanged_but_for_addresses() {
    let contract = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/contract/cql.toml"),
    )
    .expect("contract/cql.toml");
    let cluster =
        sluice_cql_testcluster::TestCluster::start(sluice_cql_testcluster::ClusterSpec::new(3, 8)).unwrap();
    let port = cluster.port().to_string();
    let admin = free_port().to_string();
    let listen = free_port().to_string();
    let text = contract
        .replace("9931", "@ADMIN@")
        .replace("19042", "@LISTEN@")
        .replace("9042", &port)
        .replace("@ADMIN@", &admin)
        .replace("@LISTEN@", &listen);
    let sluice = Sluice::start(&text);
    let (status, topo) = sluice.http_get("/topology");
    assert_eq!(status, 200);
    let topo: serde_json::Value = serde_json::from_str(&topo).unwrap();
    assert_eq!(topo["clusters"][0]["protocol"], "cql");
    assert_eq!(topo["clusters"][0]["nodes"].as_array().unwrap().len(), 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(sluice.listen_addr(), 4, Compression::None).await;
        c.ok("CREATE KEYSPACE c WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}")
            .await;
        c.ok("CREATE TABLE c.kv (k text PRIMARY KEY, v int)").await;
        c.ok("INSERT INTO c.kv (k, v) VALUES ('a', 1)").await;
    });
    let (status, body) = sluice.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
    sluice.assert_no_unexpected_errors(&[]);
}

/// The share of the token ring each node owns: every token owns the range from the previous
/// token (exclusive, wrapping around) to itself.
fn expected_ownership(tokens: &[Vec<i64>]) -> Vec<f64> {
    let mut all: Vec<(i64, usize)> = tokens
        .iter()
        .enumerate()
        .flat_map(|(i, ts)| ts.iter().map(move |t| (*t, i)))
        .collect();
    all.sort_unstable();
    let mut share = vec![0.0; tokens.len()];
    for (j, (t, owner)) in all.iter().enumerate() {
        let prev = if j == 0 {
            all[all.len() - 1].0
        } else {
            all[j - 1].0
        };
        let width = (*t as i128 - prev as i128).rem_euclid(1i128 << 64);
        share[*owner] += width as f64 / 2f64.powi(64);
    }
    share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_shows_the_ring() {
    let spec = sluice_cql_testcluster::ClusterSpec::new(3, 8)
        .with_location(0, "dc1", "r1")
        .with_location(1, "dc1", "r2")
        .with_location(2, "dc2", "r1");
    let tokens: Vec<Vec<i64>> = spec.nodes.iter().map(|n| n.tokens.clone()).collect();
    let env = Env::with_spec(spec, "", "");
    bounded(30, async {
        let want = expected_ownership(&tokens);
        let (nodes, body) = env.sluice.topology_nodes();
        assert_eq!(nodes.len(), 3, "{body}");
        let mut total = 0.0;
        for (i, (dc, rack)) in [("dc1", "r1"), ("dc1", "r2"), ("dc2", "r1")].iter().enumerate() {
            let addr = env.cluster.address(i).to_string();
            let n = nodes
                .iter()
                .find(|n| n["address"] == addr.as_str())
                .unwrap_or_else(|| panic!("{addr} in {body}"));
            assert_eq!(n["datacenter"], *dc, "{body}");
            assert_eq!(n["rack"], *rack, "{body}");
            assert_eq!(n["tokens"], 8, "{body}");
            assert_eq!(n["healthy"], true, "{body}");
            assert_eq!(n["inflight"], 0, "{body}");
            let share = n["ownership"]
                .as_f64()
                .unwrap_or_else(|| panic!("ownership in {body}"));
            assert!((share - want[i]).abs() < 1e-9, "node {i}: {share} != {}", want[i]);
            total += share;
        }
        assert!((total - 1.0).abs() < 1e-9, "{total}");

        // A node that goes down shows as unhealthy, with why.
        env.cluster.kill(2);
        let addr = env.cluster.address(2).to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (nodes, body) = env.sluice.topology_nodes();
            let n = nodes.iter().find(|n| n["address"] == addr.as_str()).unwrap();
            if n["healthy"] == false {
                assert!(n["error"].is_string(), "{body}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node 3 still healthy: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
