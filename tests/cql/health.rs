//! Node health: a node that stops answering (frozen, hung, or frozen with its port closed)
//! is marked down within seconds by the heartbeat on its connections, requests keep
//! succeeding on the other replicas (those caught on it are sent to the next replica when
//! its connections close), one line says it is down, and it comes back when it answers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_cql::{Compression, Request, Response};
use sluice_cql_testcluster::TestCluster;

use crate::client::{execute, int, text, Client};
use crate::support::bounded;
use crate::{user_records, Env};

/// How long detection may take in these tests: the default heartbeat (1 s idle + 2 s
/// timeout) plus a generous margin for a busy machine.
const DETECTION_BOUND: Duration = Duration::from_secs(10);

/// Waits until `/topology` shows `addr` with `healthy`, within `within`; returns how long.
async fn wait_health(env: &Env, addr: &str, healthy: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (nodes, body) = env.sluice.topology_nodes();
        if nodes
            .iter()
            .any(|n| n["address"] == addr && n["healthy"] == healthy)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{addr} not healthy={healthy} after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes and reads at RF 2 from two clients until stopped: (requests, failures).
fn traffic(env: &Env, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let addr = env.addr();
    tokio::spawn(async move {
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for client in 0..2 {
            let stop = stop.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(addr, 4, Compression::None).await;
                let ins = c.prepare("INSERT INTO nh.kv (k, v) VALUES (?, ?)").await;
                let sel = c.prepare("SELECT v FROM nh.kv WHERE k = ?").await;
                let mut failures = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let reqs: Vec<Request> = (i..i + 10)
                        .flat_map(|i| {
                            let k = format!("c{client}k{i}");
                            [
                                execute(&ins, vec![text(&k), int(i)]),
                                execute(&sel, vec![text(&k)]),
                            ]
                        })
                        .collect();
                    i += 10;
                    for r in c.pipeline(reqs).await {
                        done.fetch_add(1, Ordering::Relaxed);
                        if !matches!(r, Response::Result(_)) {
                            failures.push(format!("{r:?}"));
                        }
                    }
                }
                failures
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        (done.load(Ordering::Relaxed), failures)
    })
}

/// Makes a node other than the control connection's stop answering with `fault`, and checks
/// detection, the clients, the log, and the way back after `thaw`.
async fn a_silent_node_is_marked_down(
    env: &Env,
    what: &str,
    fault: fn(&TestCluster, usize),
    allowed_failures: usize,
) {
    let mut c = Client::connect(env.addr(), 4, Compression::None).await;
    c.ok("CREATE KEYSPACE nh WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 2}")
        .await;
    c.ok("CREATE TABLE nh.kv (k text PRIMARY KEY, v int)").await;
    let control = env.control_index(Duration::from_secs(15)).await;
    let victim = (control + 1) % env.cluster.len();
    let victim_addr = env.cluster.address(victim).to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(env, stop.clone());
    // Every node has taken requests (so sluice holds connections to each) before the fault.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !user_records(&env.cluster, "nh").iter().any(|r| r.node == victim) {
        assert!(Instant::now() < deadline, "node {victim} never got a request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let skip = env.sluice.logs().len();
    fault(&env.cluster, victim);
    let detected = wait_health(env, &victim_addr, false, DETECTION_BOUND).await;
    eprintln!("[health] {what}: {victim_addr} marked down {detected:?} after the fault");
    // Requests go on for a while on the other replicas.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.cluster.clear_records();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        user_records(&env.cluster, "nh").iter().all(|r| r.node != victim),
        "the down node got requests"
    );
    let (_, body) = env.sluice.topology_nodes();
    assert!(
        [
            "no answer to a heartbeat",
            "unreachable",
            "in a row got no answer"
        ]
        .iter()
        .any(|e| body.contains(e)),
        "{body}"
    );
    // One line says it is down, whatever noticed it first.
    let down_lines: Vec<String> = env.sluice.logs()[skip..]
        .iter()
        .filter(|l| l.contains("CQL node is down") && l.contains(&victim_addr))
        .cloned()
        .collect();
    assert_eq!(down_lines.len(), 1, "{down_lines:#?}");
    // Back: it answers again, is marked up, and takes requests.
    env.cluster.thaw(victim);
    let back = wait_health(env, &victim_addr, true, DETECTION_BOUND).await;
    eprintln!("[health] {what}: {victim_addr} healthy again {back:?} after the thaw");
    env.cluster.clear_records();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !user_records(&env.cluster, "nh").iter().any(|r| r.node == victim) {
        assert!(
            Instant::now() < deadline,
            "node {victim} gets no requests after it came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (done, failures) = load.await.unwrap();
    eprintln!("[health] {what}: {done} requests, {} failed", failures.len());
    // With request_timeout (12 s) longer than detection, requests caught on the silent node
    // are sent to the other replica when its connections close, so none fails. With a
    // shorter one, those that time out first fail (with the timeout error), at most the
    // requests in flight at the fault.
    assert!(
        failures.len() <= allowed_failures,
        "{} of {done} failed: {failures:#?}",
        failures.len()
    );
    assert!(
        failures.iter().all(|f| f.contains("no answer from")),
        "{failures:#?}"
    );
    let up_lines = env.sluice.logs()[skip..]
        .iter()
        .filter(|l| l.contains("CQL node is up") && l.contains(&victim_addr))
        .count();
    assert_eq!(up_lines, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_marked_down_within_seconds_and_clients_see_no_error() {
    let env = Env::start(4, "", "");
    bounded(
        90,
        a_silent_node_is_marked_down(&env, "frozen", |c, i| c.freeze(i), 0),
    )
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_reads_but_never_answers_is_marked_down() {
    let env = Env::start(4, "", "");
    bounded(
        90,
        a_silent_node_is_marked_down(&env, "hung", |c, i| c.hang(i), 0),
    )
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_that_stops_accepting_is_marked_down() {
    let env = Env::start(4, "", "");
    bounded(
        90,
        a_silent_node_is_marked_down(&env, "not accepting", |c, i| c.stop_accepting(i), 0),
    )
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// The colleague's setting: `request_timeout = 1s`, shorter than the heartbeat's detection.
/// Three timeouts in a row mark the node down at about 1 s; the requests that timed out on it
/// fail (at most the 2 × 20 in flight), every other one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_with_a_short_request_timeout_is_marked_down_by_its_timeouts() {
    let env = Env::start(4, "", "[clusters.cql]\nrequest_timeout = \"1s\"\n");
    bounded(
        90,
        a_silent_node_is_marked_down(&env, "frozen, request_timeout 1s", |c, i| c.freeze(i), 40),
    )
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
