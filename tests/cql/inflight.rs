//! Requests in flight on a node connection (the two-hop path: no task per request, the node
//! connection's reader answers the client): a request that timed out keeps its stream id on
//! the node connection until the late answer comes, so the late answer reaches nobody; and a
//! connection lost with requests in flight sends them to another replica, except an LWT,
//! which fails (the node may have applied it). A client that never reads its answers holds
//! up no other client of the node connection it shares, and stops being read.

use std::time::{Duration, Instant};

use sluice_cql::response::{error_code, ResultBody};
use sluice_cql::{Compression, Response};

use crate::client::{error_of, int, query, text, Client};
use crate::support::bounded;
use crate::Env;

/// A key of `keyspace` whose replicas, in ring order, are exactly `replicas`.
fn key_on(env: &Env, keyspace: &str, prefix: &str, replicas: &[usize]) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| {
            env.cluster
                .replicas(keyspace, sluice_cql::murmur3::token(k.as_bytes()))
                == replicas
        })
        .unwrap_or_else(|| panic!("no key with replicas {replicas:?}"))
}

/// Waits until sluice counts `want` requests in flight to node `node`.
async fn inflight_reaches(env: &Env, node: usize, want: f64) {
    let series = format!(
        "sluice_cql_node_inflight{{cluster=\"ring\",node=\"{}\"}}",
        env.cluster.address(node)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if env.sluice.metric(&series) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {:?}, never {want}",
            env.sluice.metric(&series)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_after_a_timeout_is_dropped_not_delivered_to_a_reused_stream_id() {
    // One connection per node (the late answer and the next request share it); no
    // heartbeat and no marking down by timeouts, so the frozen node stays in use.
    let env = Env::start(
        2,
        "",
        "[clusters.cql]\nrequest_timeout = \"300ms\"\nmax_consecutive_timeouts = 0\nheartbeat_interval = \"60s\"\nconnections_per_node = 1\n",
    );
    bounded(60, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        c.ok("CREATE KEYSPACE lt WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE lt.kv (k text PRIMARY KEY, v int)").await;
        let victim = (env.control_index(Duration::from_secs(15)).await + 1) % 2;
        let a = key_on(&env, "lt", "a", &[victim]);
        let b = key_on(&env, "lt", "b", &[victim]);
        c.ok(&format!("INSERT INTO lt.kv (k, v) VALUES ('{a}', 1)")).await;
        c.ok(&format!("INSERT INTO lt.kv (k, v) VALUES ('{b}', 2)")).await;

        env.cluster.freeze(victim);
        let select = |k: &str| query(&format!("SELECT v FROM lt.kv WHERE k = '{k}'"), vec![]);
        c.send(7, &select(&a)).await;
        let (stream, r) = c.recv().await.expect("an answer");
        assert_eq!(stream, 7);
        let e = error_of(&r);
        assert_eq!(e.code, error_code::SERVER_ERROR, "{e:?}");
        assert!(e.message.contains("no answer from"), "{e:?}");

        // The node wakes up and answers the first request late, then the next one, on the
        // same connection: the client's stream 7 gets only the answer to its new request.
        env.cluster.thaw(victim);
        c.send(7, &select(&b)).await;
        let (stream, r) = c.recv().await.expect("an answer");
        assert_eq!(stream, 7);
        match r {
            Response::Result(ResultBody::Rows(rows)) => {
                assert_eq!(
                    rows.rows().unwrap(),
                    vec![vec![Some(int(2))]],
                    "the late answer came through"
                )
            }
            other => panic!("{other:?}"),
        }
        // Nothing else arrives: the next request's answer is the next envelope.
        c.send(8, &select(&a)).await;
        let (stream, r) = c.recv().await.expect("an answer");
        assert_eq!(stream, 8);
        assert!(matches!(r, Response::Result(ResultBody::Rows(_))), "{r:?}");
        inflight_reaches(&env, victim, 0.0).await;
        let timeouts = env
            .sluice
            .metric("sluice_errors_total{cluster=\"ring\",reason=\"timeout\"}");
        assert_eq!(timeouts, Some(1.0));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_on_a_lost_connection_go_to_another_replica_except_lwts() {
    let env = Env::start(3, "", "[clusters.cql]\nheartbeat_interval = \"60s\"\n");
    bounded(60, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        c.ok("CREATE KEYSPACE lc WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}")
            .await;
        c.ok("CREATE TABLE lc.kv (k text PRIMARY KEY, v int)").await;
        // The victim is not the control connection's node, and it comes first both in ring
        // order (for the LWT) and by index among equally busy replicas (for the read).
        let control = env.control_index(Duration::from_secs(15)).await;
        let victim = (0..3).find(|&n| n != control).unwrap();
        let other = (victim + 1..3).next().unwrap();
        let k = key_on(&env, "lc", "k", &[victim, other]);
        c.ok(&format!("INSERT INTO lc.kv (k, v) VALUES ('{k}', 1)")).await;
        let before = crate::user_records(&env.cluster, "lc").len();
        assert!(before > 0);

        env.cluster.freeze(victim);
        c.send(1, &query(&format!("SELECT v FROM lc.kv WHERE k = '{k}'"), vec![]))
            .await;
        c.send(
            2,
            &query(
                "INSERT INTO lc.kv (k, v) VALUES (?, ?) IF NOT EXISTS",
                vec![text(&k), int(5)],
            ),
        )
        .await;
        // Both wait on the frozen node; then its connections drop.
        inflight_reaches(&env, victim, 2.0).await;
        env.cluster.kill(victim);
        let mut answers = std::collections::HashMap::new();
        for _ in 0..2 {
            let (stream, r) = c.recv().await.expect("an answer");
            answers.insert(stream, r);
        }
        match &answers[&1] {
            Response::Result(ResultBody::Rows(rows)) => {
                assert_eq!(rows.rows().unwrap(), vec![vec![Some(int(1))]])
            }
            other => panic!("the read was not sent to the other replica: {other:?}"),
        }
        let e = error_of(&answers[&2]);
        assert_eq!(e.code, error_code::SERVER_ERROR, "{e:?}");
        assert!(e.message.contains("connection to the node was lost"), "{e:?}");
        // The read was answered by the other replica; the LWT reached no other node (the
        // frozen node may have read and applied both without answering: a stopped process
        // can stop after reading).
        let records = crate::user_records(&env.cluster, "lc");
        let after: Vec<_> = records.iter().skip(before).collect();
        assert!(after.iter().any(|r| r.node == other && !r.lwt), "{after:?}");
        assert!(after.iter().all(|r| r.node == victim || !r.lwt), "{after:?}");
        let lost = env
            .sluice
            .metric("sluice_errors_total{cluster=\"ring\",reason=\"backend_lost\"}");
        assert_eq!(lost, Some(1.0));
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// `sluice_cql_request_duration_seconds_count` of QUERY: queries answered so far.
fn queries_answered(env: &Env) -> f64 {
    env.sluice
        .metric("sluice_cql_request_duration_seconds_count{cluster=\"ring\",opcode=\"query\"}")
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_blocks_no_one() {
    // One node and one connection to it: the two clients' requests and answers share it.
    // `max_requests_per_client = 64`: what a client may have in flight beyond the answers
    // waiting for it.
    let env = Env::start(
        1,
        "",
        "[clusters.cql]\nconnections_per_node = 1\nheartbeat_interval = \"60s\"\nmax_requests_per_client = 64\n",
    );
    bounded(120, async {
        let mut c = Client::connect(env.addr(), 4, Compression::None).await;
        c.ok("CREATE KEYSPACE nr WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
            .await;
        c.ok("CREATE TABLE nr.kv (k text PRIMARY KEY, v text)").await;
        let big = "x".repeat(256 * 1024);
        let insert = query(
            "INSERT INTO nr.kv (k, v) VALUES (?, ?)",
            vec![text("big"), text(&big)],
        );
        assert!(matches!(c.call(insert).await, Response::Result(_)));
        c.ok("INSERT INTO nr.kv (k, v) VALUES ('small', 'v')").await;
        let before = queries_answered(&env);

        // 2,000 requests for 256 KiB answers (500 MiB), pipelined, never read: far more than
        // the sockets' buffers hold.
        const STUCK: usize = 2000;
        let mut stuck = Client::connect(env.addr(), 4, Compression::None).await;
        let stuck_sender = tokio::spawn(async move {
            let select = query("SELECT v FROM nr.kv WHERE k = 'big'", vec![]);
            for i in 0..STUCK {
                stuck.send(1 + (i % 30_000) as i16, &select).await;
            }
            stuck
        });
        // Its answers flow until they fill every buffer between sluice and it and its 64
        // requests in flight are answered. How much those buffers hold depends on the kernel's
        // TCP autotuning (sluice stopped at 85 answers on one CI machine, 5 MiB of buffers
        // beside the 64): wait for the count every machine reaches, 64 answers, and let the
        // other client's requests below run while the stuck client's answers stall.
        let deadline = Instant::now() + Duration::from_secs(30);
        while queries_answered(&env) < before + 64.0 {
            assert!(
                Instant::now() < deadline,
                "sluice answered {} of the stuck client's requests",
                queries_answered(&env) - before
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // The other client, on the same node connection, gets every answer (each within
        // `Client::recv`'s bound).
        const OTHER: usize = 200;
        let small = || query("SELECT v FROM nr.kv WHERE k = 'small'", vec![]);
        for _ in 0..OTHER {
            match c.call(small()).await {
                Response::Result(ResultBody::Rows(rows)) => {
                    assert_eq!(rows.rows().unwrap(), vec![vec![Some(text("v"))]])
                }
                other => panic!("{other:?}"),
            }
        }
        // sluice stopped reading the stuck client: it answered no more than what the buffers,
        // the client's outbox bound and its 64 requests in flight hold, not all 2,000.
        let stuck_answered = queries_answered(&env) - before - OTHER as f64;
        assert!(
            stuck_answered < (STUCK / 2) as f64,
            "sluice answered {stuck_answered} requests of a client that reads nothing"
        );
        stuck_sender.abort();
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
