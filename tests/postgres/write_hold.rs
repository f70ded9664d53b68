//! `write_hold`: a planned switchover without PAUSE. While no node is confirmed as a writable
//! primary (the primary read-only, stopped, a replica not yet promoted), new write transactions
//! wait in sluice instead of failing; in-flight ones and reads are not held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::pgbench::pgbench;
use crate::support::{self, bounded, PgCluster, Sluice};
use crate::wait_all_probed;

const CLIENTS: usize = 16;
const ACTIVE: &str = "sluice_write_hold_active{cluster=\"app\"}";

/// What one client saw.
#[derive(Default)]
struct Seen {
    committed: AtomicU64,
    /// (SQLSTATE, statement) of each failed transaction.
    failures: Mutex<Vec<(String, String)>>,
    /// The longest transaction, start of BEGIN to the end of END.
    longest: Mutex<Duration>,
}

/// Runs pgbench's TPC-B transaction (simple protocol, as `pgbench -M simple`) until `stop`,
/// without retries: a failed statement is rolled back and counted, and the client goes on.
async fn tpcb_client(client: Client, seed: u64, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n + 1
    };
    while !stop.load(Ordering::SeqCst) {
        let (aid, bid, tid, delta) = (next(100_000), 1, next(10), next(10_000) as i64 - 5_000);
        let script = [
            "BEGIN".to_string(),
            format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid}"),
            format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"),
            format!("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid}"),
            format!("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid}"),
            format!(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP)"
            ),
            "END".to_string(),
        ];
        let started = Instant::now();
        let mut failed = None;
        for sql in &script {
            if let Err(e) = client.batch_execute(sql).await {
                let code = e.code().map_or("none", |c| c.code()).to_string();
                failed = Some((code, sql.split_whitespace().next().unwrap_or("").to_string()));
                break;
            }
        }
        match failed {
            None => {
                seen.committed.fetch_add(1, Ordering::SeqCst);
                let took = started.elapsed();
                let mut longest = seen.longest.lock().unwrap();
                *longest = (*longest).max(took);
            }
            Some(f) => {
                let lost = f.0 == "none";
                seen.failures.lock().unwrap().push(f);
                if lost || client.batch_execute("ROLLBACK").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits until `done` holds, polling every 10 ms, for at most `secs`.
async fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `SHOW POOLS` cl_waiting of database `app`, summed.
async fn cl_waiting(console: &Client) -> usize {
    let rows = support::simple_rows(console, "SHOW POOLS").await;
    rows.iter()
        .filter(|r| r[0] == "app")
        .map(|r| r[3].parse::<usize>().unwrap())
        .sum()
}

/// A planned switchover done without PAUSE: the primary is made read-only, stopped cleanly,
/// the replica promoted and the old primary restarted as its replica, under 16 TPC-B clients
/// that never retry. sluice holds new write transactions from the moment it learns the primary
/// is read-only until the promoted node answers its probe as a writable primary.
///
/// What can fail, and is asserted exactly: a transaction that *began* on the old primary after
/// its server process applied the reload (PostgreSQL fixes a transaction's read-only status at
/// its start) and before sluice learnt of it, which gets 25006 at its first write. The first
/// such 25006 makes sluice probe the primary at once and hold every new write meanwhile, so
/// each client loses at most that one transaction. Transactions already running when the
/// primary turned read-only commit; none fails at the stop (sluice waits until every client is
/// held before the test stops the primary) or at the promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_without_pause_holds_writes_instead_of_failing_them() {
    let cluster = PgCluster::start(1);
    let (toml, _, _) = support::sluice_config(
        &cluster,
        "write_hold = \"60s\"\nprobe_interval = \"200ms\"\npool_size = 20",
    );
    let toml = toml.replacen("[admin]\n", "[admin]\nstats_users = [\"app\"]\n", 1);
    let sluice = Sluice::start(&toml);
    wait_all_probed(&sluice, 2);
    let (old, new) = (cluster.primary_port(), cluster.replica_ports()[0]);
    let addr = sluice.listen_addr();
    bounded(300, async {
        let init = pgbench(old, &["-i", "-s", "1", "-q"]).await;
        assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        cluster.wait_replicated().await;
        assert_eq!(sluice.metric(ACTIVE), Some(0.0), "no hold before the switchover");
        let console = support::connect(addr, "app", "app-secret", "sluice").await;

        let stop = Arc::new(AtomicBool::new(false));
        let seen: Vec<Arc<Seen>> = (0..CLIENTS).map(|_| Arc::default()).collect();
        let mut tasks = Vec::new();
        for (i, s) in seen.iter().enumerate() {
            let client = support::connect(addr, "app", "app-secret", "app").await;
            tasks.push(tokio::spawn(tpcb_client(client, i as u64 + 1, stop.clone(), s.clone())));
        }
        let committed = |seen: &[Arc<Seen>]| -> Vec<u64> {
            seen.iter().map(|s| s.committed.load(Ordering::SeqCst)).collect()
        };
        // Every client is running.
        wait_until(60, "every client to commit 5 transactions", || {
            committed(&seen).iter().all(|&c| c >= 5)
        })
        .await;
        for s in &seen {
            *s.longest.lock().unwrap() = Duration::ZERO;
        }

        // 1. The primary turns read-only (what an operator or a switchover script does first).
        let switch = Instant::now();
        let read_only = tokio::task::block_in_place(|| {
            cluster.psql(
                old,
                "postgres",
                "ALTER SYSTEM SET default_transaction_read_only = on",
            );
            cluster.psql(old, "postgres", "SELECT pg_reload_conf()");
            switch.elapsed()
        });
        // sluice notices (probe, or a 25006 from the primary) and holds new writes: every
        // client ends up held, none in a transaction on the old primary.
        let held_at = {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if sluice.metric(ACTIVE) == Some(1.0) {
                    break switch.elapsed();
                }
                assert!(Instant::now() < deadline, "sluice never started a write hold");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let waiting = cl_waiting(&console).await;
            if waiting == CLIENTS {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {waiting} of {CLIENTS} clients held (SHOW POOLS cl_waiting)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all_held = switch.elapsed();
        // SHOW NODES says why.
        let deadline = Instant::now() + Duration::from_secs(10);
        let old_addr = format!("127.0.0.1:{old}");
        loop {
            let nodes = support::simple_rows(&console, "SHOW NODES").await;
            if nodes.iter().any(|r| r[2] == old_addr && r[3] == "read-only-primary") {
                break;
            }
            assert!(Instant::now() < deadline, "SHOW NODES: {nodes:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let failed_before_stop: usize = seen.iter().map(|s| s.failures.lock().unwrap().len()).sum();
        let committed_at_hold = committed(&seen);

        // 2. Stop it cleanly, promote the replica.
        let stopped = Instant::now();
        tokio::task::block_in_place(|| {
            cluster.stop_node(old);
            cluster.promote(0);
        });
        let stop_promote = stopped.elapsed();
        // 3. The hold ends once the promoted node answers as a writable primary.
        let deadline = Instant::now() + Duration::from_secs(60);
        while sluice.metric(ACTIVE) != Some(0.0) {
            assert!(Instant::now() < deadline, "the write hold never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let hold_ended = switch.elapsed();
        // Every client's held transaction commits on the new primary.
        wait_until(60, "every client to commit on the new primary", || {
            committed(&seen)
                .iter()
                .zip(&committed_at_hold)
                .all(|(now, then)| now > then)
        })
        .await;
        let all_resumed = switch.elapsed();
        let pauses: Vec<Duration> = seen.iter().map(|s| *s.longest.lock().unwrap()).collect();
        // 4. The old primary comes back as a replica of the new one.
        tokio::task::block_in_place(|| cluster.follow(old, new));
        // Every client commits on the new primary.
        wait_until(60, "every client to commit 5 transactions after the switchover", || {
            committed(&seen)
                .iter()
                .zip(&committed_at_hold)
                .all(|(now, then)| *now >= then + 5)
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }

        let failures: Vec<Vec<(String, String)>> =
            seen.iter().map(|s| s.failures.lock().unwrap().clone()).collect();
        let total_failed: usize = failures.iter().map(Vec::len).sum();
        let total_committed: u64 = committed(&seen).iter().sum();
        let (shortest_pause, longest_pause) = (
            pauses.iter().min().copied().unwrap_or_default(),
            pauses.iter().max().copied().unwrap_or_default(),
        );
        let held = sluice.metric("sluice_write_hold_requests_total{cluster=\"app\"}").unwrap_or(0.0);
        eprintln!(
            "[write_hold] {CLIENTS} clients TPC-B, no retries: {total_committed} committed, {total_failed} failed \
             ({failures:?}); read-only set in {read_only:?}, hold started {held_at:?} after it, every client held at \
             {all_held:?}; stop + promote took {stop_promote:?}; hold ended {hold_ended:?} after the read-only step, every client committed again at {all_resumed:?}; \
             {held} requests held; the pause each client saw (its longest transaction) {shortest_pause:?}..{longest_pause:?}"
        );
        // Exactly what the design allows to fail: at most one transaction per client, with
        // 25006 at its first write, all before every client was held; nothing at the stop or
        // the promotion.
        for (i, f) in failures.iter().enumerate() {
            assert!(f.len() <= 1, "client {i} lost more than one transaction: {f:?}");
            for (code, statement) in f {
                assert_eq!(
                    (code.as_str(), statement.as_str()),
                    ("25006", "UPDATE"),
                    "client {i}: only the first write of a transaction begun on the read-only primary may fail"
                );
            }
        }
        assert_eq!(total_failed, failed_before_stop, "a transaction failed at the stop or the promotion");
        assert!(held >= CLIENTS as f64, "{held} requests held");
        // The new primary took the writes.
        let on_new = cluster.psql(new, "app", "SELECT count(*) FROM pgbench_history");
        assert!(on_new.trim().parse::<u64>().unwrap() >= total_committed, "{on_new} < {total_committed}");
    })
    .await;
    let logs = sluice.logs();
    let started = logs.iter().filter(|l| l.contains("write hold started")).count();
    let ended = logs.iter().filter(|l| l.contains("write hold ended")).count();
    assert_eq!((started, ended), (1, 1), "one log line each way, not per client");
    sluice.assert_no_unexpected_errors(&[
        "lost the connection",
        "marking the node down",
        "terminating connection",
        "probe",
    ]);
}
