//! `/metrics` for a CQL cluster: the `sluice_cql_*` series exist at 0 from the start, and
//! requests through sluice move exactly the counters they should (route, coordinator,
//! latency, errors by code, node connections and in-flight, control events, re-prepares).

use std::time::{Duration, Instant};

use sluice_cql::response::{error_code, ResultBody};
use sluice_cql::Compression;

use crate::client::{error_of, text, Client};
use crate::support::bounded;
use crate::Env;

/// `sluice_cql_<name>{cluster="ring",<labels>}`.
fn series(name: &str, labels: &str) -> String {
    format!("sluice_cql_{name}{{cluster=\"ring\",{labels}}}")
}

fn value(env: &Env, name: &str, labels: &str) -> f64 {
    let s = series(name, labels);
    env.sluice
        .metric(&s)
        .unwrap_or_else(|| panic!("{s} is not in /metrics:\n{}", env.sluice.http_get("/metrics").1))
}

/// Waits (bounded) until the series reaches at least `want`.
async fn at_least(env: &Env, name: &str, labels: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = value(env, name, labels);
        if v >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} stays at {v} < {want}",
            series(name, labels)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_requests_move_the_expected_counters() {
    let env = Env::start(3, "", "");
    bounded(90, async {
        // Known label sets are there at 0 before the first request.
        for (opcode, routes) in [
            ("query", &["token", "any", "lwt", "local"][..]),
            ("execute", &["token", "any", "lwt", "local"]),
            ("batch", &["token", "any", "lwt"]),
            ("prepare", &["any", "local"]),
        ] {
            for route in routes {
                let labels = format!("opcode=\"{opcode}\",route=\"{route}\"");
                assert_eq!(value(&env, "requests_total", &labels), 0.0, "{labels}");
            }
            let labels = format!("opcode=\"{opcode}\"");
            assert_eq!(value(&env, "request_duration_seconds_count", &labels), 0.0);
        }
        for code in [
            "server_error",
            "unavailable",
            "read_timeout",
            "invalid",
            "syntax_error",
            "unprepared",
        ] {
            assert_eq!(
                value(&env, "errors_total", &format!("code=\"{code}\"")),
                0.0,
                "{code}"
            );
        }
        for (name, labels) in [
            ("coordinators_total", "coordinator=\"replica\""),
            ("coordinators_total", "coordinator=\"other\""),
            ("reprepares_total", "result=\"ok\""),
            ("reprepares_total", "result=\"error\""),
            ("control_events_total", "event=\"topology_change\""),
        ] {
            assert_eq!(value(&env, name, labels), 0.0, "{name}{{{labels}}}");
        }
        at_least(&env, "control_events_total", "event=\"connected\"", 1.0).await;

        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        // any: 2 schema statements, a scan, an invalid column.
        c.ok("CREATE KEYSPACE m WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE m.kv (k text PRIMARY KEY, v int)").await;
        // token: 10 single-partition writes.
        for i in 0..10 {
            c.ok(&format!("INSERT INTO m.kv (k, v) VALUES ('k{i}', {i})"))
                .await;
        }
        c.rows("SELECT * FROM m.kv").await;
        let bad = c.query("SELECT nope FROM m.kv").await;
        assert_eq!(error_of(&bad).code, error_code::INVALID);
        // lwt: 2.
        c.rows("INSERT INTO m.kv (k, v) VALUES ('l1', 1) IF NOT EXISTS")
            .await;
        c.rows("INSERT INTO m.kv (k, v) VALUES ('l2', 1) IF NOT EXISTS")
            .await;
        // local: 3 system.local reads and a USE.
        for _ in 0..3 {
            c.rows("SELECT release_version FROM system.local").await;
        }
        assert_eq!(c.ok("USE m").await, ResultBody::SetKeyspace("m".into()));
        // prepare (any) once, execute (token) 5 times.
        let sel = c.prepare("SELECT v FROM m.kv WHERE k = ?").await;
        for i in 0..5 {
            assert!(matches!(
                c.execute(&sel, vec![text(&format!("k{i}"))]).await,
                sluice_cql::Response::Result(ResultBody::Rows(_))
            ));
        }

        for (labels, want) in [
            ("opcode=\"query\",route=\"token\"", 10.0),
            ("opcode=\"query\",route=\"any\"", 4.0),
            ("opcode=\"query\",route=\"lwt\"", 2.0),
            ("opcode=\"query\",route=\"local\"", 4.0),
            ("opcode=\"prepare\",route=\"any\"", 1.0),
            ("opcode=\"execute\",route=\"token\"", 5.0),
            ("opcode=\"execute\",route=\"any\"", 0.0),
            ("opcode=\"batch\",route=\"token\"", 0.0),
        ] {
            assert_eq!(value(&env, "requests_total", labels), want, "{labels}");
        }
        // Every request with a token was coordinated by a replica (all nodes are up).
        assert_eq!(value(&env, "coordinators_total", "coordinator=\"replica\""), 17.0);
        assert_eq!(value(&env, "coordinators_total", "coordinator=\"other\""), 0.0);
        // Latency of every forwarded request (local answers are not in it).
        assert_eq!(
            value(&env, "request_duration_seconds_count", "opcode=\"query\""),
            16.0
        );
        assert_eq!(
            value(&env, "request_duration_seconds_count", "opcode=\"execute\""),
            5.0
        );
        assert_eq!(
            value(&env, "request_duration_seconds_count", "opcode=\"prepare\""),
            1.0
        );
        assert_eq!(value(&env, "errors_total", "code=\"invalid\""), 1.0);
        assert_eq!(value(&env, "errors_total", "code=\"unavailable\""), 0.0);
        // Node connections are open, nothing is in flight any more.
        let (mut conns, mut inflight) = (0.0, 0.0);
        for i in 0..3 {
            let node = format!("node=\"{}\"", env.cluster.address(i));
            conns += value(&env, "node_connections", &node);
            inflight += value(&env, "node_inflight", &node);
        }
        assert!(conns >= 1.0, "{conns}");
        assert_eq!(inflight, 0.0);
        at_least(&env, "control_events_total", "event=\"schema_change\"", 1.0).await;

        // A node restarts and forgets the prepared statement: sluice prepares it again.
        let control = env.control_index(Duration::from_secs(10)).await;
        let n = (control + 1) % 3;
        let key = (0..1000)
            .map(|i| format!("p{i}"))
            .find(|k| {
                env.cluster
                    .replicas("m", sluice_cql::murmur3::token(k.as_bytes()))
                    == vec![n]
            })
            .unwrap();
        // (The statement may have been prepared again already: an EXECUTE can reach a node
        // before sluice's background PREPARE on it does.)
        let before = value(&env, "reprepares_total", "result=\"ok\"");
        env.cluster.kill(n);
        at_least(&env, "control_events_total", "event=\"status_change\"", 1.0).await;
        env.cluster.restart(n).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (nodes, body) = env.sluice.topology_nodes();
            let addr = env.cluster.address(n).to_string();
            if nodes
                .iter()
                .any(|x| x["address"] == addr.as_str() && x["healthy"] == true)
            {
                break;
            }
            assert!(Instant::now() < deadline, "node {n} not back up: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = c.execute(&sel, vec![text(&key)]).await;
        assert!(
            matches!(r, sluice_cql::Response::Result(ResultBody::Rows(_))),
            "{r:?}"
        );
        assert_eq!(value(&env, "reprepares_total", "result=\"ok\""), before + 1.0);
        assert_eq!(value(&env, "errors_total", "code=\"unprepared\""), 0.0);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_cql_dashboard_queries_only_exported_metrics() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/sluice-cql-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let metric = regex::Regex::new(r"\bsluice_[a-zA-Z0-9_:]+").unwrap();
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "panel without a query: {}", panel["title"]);
        for t in targets {
            let e = t["expr"].as_str().expect("target expr");
            assert!(e.contains("$cluster"), "query ignores $cluster: {e}");
            used.extend(metric.find_iter(e).map(|m| m.as_str().to_string()));
        }
    }
    assert!(
        used.iter().filter(|m| m.starts_with("sluice_cql_")).count() >= 8,
        "{used:?}"
    );

    let env = Env::start(3, "", "");
    bounded(30, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        c.rows("SELECT keyspace_name FROM system_schema.keyspaces").await;
        crate::support::wait_until_exported(&env.sluice, &used, "CQL dashboard").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
