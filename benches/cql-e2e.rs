//! End-to-end CQL load: prepared reads and writes against the CQL test cluster
//! (`tests/cql-cluster`, in-memory nodes on 127.0.0.1..N), straight to the cluster with a
//! token-aware and a round-robin scylla driver, and through `target/release/sluice` with a
//! round-robin driver that knows only sluice. Runs are interleaved and repeated; the table shows
//! medians of throughput, p50/p99 latency and sluice's CPU time per request (utime + stime
//! from /proc/PID/stat around each run).
//!
//! ```text
//! cargo build --release --bin sluice
//! cargo bench --bench cql-e2e -- [--duration S] [--reps N] [--concurrency C] [--rate R]
//!                                [--nodes N] [--rf RF] [--keys K] [--sluice PATH] [--out DIR]
//! ```
//!
//! Two phases: saturation (C concurrent requests in flight, as fast as possible) and paced
//! (C workers sharing R requests per second, below saturation) for the added p99 latency.
//! Results go to `--out` (default `target/cql-e2e`) as results.json. Without `--bench` (as under
//! `cargo test --all-targets`) it only prints how to run it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::prepared::PreparedStatement;
use sluice_cql_testcluster::{ClusterSpec, TestCluster};

struct Opts {
    duration: Duration,
    reps: usize,
    concurrency: usize,
    rate: f64,
    nodes: usize,
    rf: usize,
    keys: usize,
    sluice: PathBuf,
    out: PathBuf,
}

fn opts() -> Option<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        duration: Duration::from_secs(5),
        reps: 3,
        concurrency: 16,
        rate: 2000.0,
        nodes: 3,
        rf: 2,
        keys: 10_000,
        sluice: root.join("target/release/sluice"),
        out: root.join("target/cql-e2e"),
    };
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--bench" => bench = true,
            "--duration" => o.duration = Duration::from_secs_f64(v("--duration").parse().expect("seconds")),
            "--reps" => o.reps = v("--reps").parse().expect("count"),
            "--concurrency" => o.concurrency = v("--concurrency").parse().expect("count"),
            "--rate" => o.rate = v("--rate").parse().expect("requests per second"),
            "--nodes" => o.nodes = v("--nodes").parse().expect("count"),
            "--rf" => o.rf = v("--rf").parse().expect("count"),
            "--keys" => o.keys = v("--keys").parse().expect("count"),
            "--sluice" => o.sluice = v("--sluice").into(),
            "--out" => o.out = v("--out").into(),
            other => panic!("unknown argument {other:?} (see the header of benches/cql-e2e.rs)"),
        }
    }
    bench.then_some(o)
}

/// The sluice child process; killed on drop.
struct SluiceProc {
    child: Child,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for SluiceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn start_sluice(o: &Opts, cluster: &TestCluster) -> SluiceProc {
    assert!(
        o.sluice.exists(),
        "no sluice binary at {} (cargo build --release --bin sluice)",
        o.sluice.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
    let seeds = cluster.contact_points_toml();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[[clusters]]\nname = \"ring\"\nprotocol = \"cql\"\nlisten = \"{listen}\"\n\n[clusters.discovery]\nstatic = {seeds}\n",
        free_port()
    );
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config).expect("write config");
    let log = std::fs::File::create(dir.path().join("sluice.log")).expect("log file");
    let child = Command::new(&o.sluice)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sluice");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "sluice did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    SluiceProc {
        child,
        listen,
        _dir: dir,
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3. Clock ticks are 100 Hz
    // on Linux (sysconf(_SC_CLK_TCK)).
    (ticks(11) + ticks(12)) / 100.0
}

async fn session(nodes: &[SocketAddr], token_aware: bool) -> Session {
    let policy = DefaultPolicy::builder().token_aware(token_aware).build();
    let profile = ExecutionProfile::builder().load_balancing_policy(policy).build();
    let mut b = SessionBuilder::new().default_execution_profile_handle(profile.into_handle());
    for n in nodes {
        b = b.known_node_addr(*n);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match b.build().await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("[cql-e2e] session to {nodes:?} not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("session to {nodes:?}: {e}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
}

struct RunResult {
    target: &'static str,
    op: &'static str,
    phase: &'static str,
    rep: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    sluice_cpu_s: Option<f64>,
}

impl RunResult {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn cpu_us_per_request(&self) -> Option<f64> {
        self.sluice_cpu_s.map(|c| c * 1e6 / self.requests.max(1) as f64)
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    session: Arc<Session>,
    stmt: PreparedStatement,
    op: Op,
    o: &Opts,
    paced: bool,
    sluice_pid: Option<u32>,
    target: &'static str,
    rep: usize,
) -> RunResult {
    let cpu0 = sluice_pid.map(cpu_seconds);
    let start = Instant::now();
    let deadline = start + o.duration;
    // Paced: every worker sends one request per `interval`, on a fixed schedule.
    let interval = Duration::from_secs_f64(o.concurrency as f64 / o.rate);
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let session = session.clone();
        let stmt = stmt.clone();
        let keys = o.keys;
        let concurrency = o.concurrency;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0usize;
            let mut i = w;
            let mut next = Instant::now() + interval.mul_f64(w as f64 / concurrency as f64);
            while Instant::now() < deadline {
                if paced {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                let k = format!("k{}", i % keys);
                i += concurrency;
                let t = Instant::now();
                let r = match op {
                    Op::Read => session.execute_unpaged(&stmt, (k.as_str(),)).await,
                    Op::Write => session.execute_unpaged(&stmt, (k.as_str(), i as i32)).await,
                };
                lat.push(t.elapsed().as_micros() as u32);
                if r.is_err() {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        lat.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = match (sluice_pid, cpu0) {
        (Some(p), Some(c0)) => Some(cpu_seconds(p) - c0),
        _ => None,
    };
    lat.sort_unstable();
    let q = |x: f64| {
        lat.get(((lat.len() as f64 * x) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    RunResult {
        target,
        op: if op == Op::Read { "read" } else { "write" },
        phase: if paced { "paced" } else { "saturation" },
        rep,
        requests: lat.len(),
        errors,
        seconds,
        p50_us: q(0.50),
        p99_us: q(0.99),
        mean_us: lat.iter().map(|&v| v as f64).sum::<f64>() / lat.len().max(1) as f64,
        sluice_cpu_s: cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let Some(o) = opts() else {
        eprintln!("cql-e2e: run it with `cargo bench --bench cql-e2e -- [options]` (see benches/cql-e2e.rs)");
        return;
    };
    let cluster = TestCluster::start(ClusterSpec::new(o.nodes, 8)).expect("CQL test cluster");
    let sluice = start_sluice(&o, &cluster);
    let pid = sluice.child.id();
    let direct: Vec<SocketAddr> = (0..o.nodes).map(|i| cluster.address(i)).collect();
    eprintln!(
        "[cql-e2e] {} nodes (RF {}) at {:?}; sluice pid {pid} on {}",
        o.nodes, o.rf, direct, sluice.listen
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(async {
        let ta = Arc::new(session(&direct, true).await);
        ta.query_unpaged(
            format!(
                "CREATE KEYSPACE bench WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                o.rf
            ),
            &[],
        )
        .await
        .expect("create keyspace");
        ta.query_unpaged("CREATE TABLE bench.kv (k text PRIMARY KEY, v int)", &[])
            .await
            .expect("create table");
        ta.await_schema_agreement().await.expect("schema agreement");
        let rr = Arc::new(session(&direct, false).await);
        let through = Arc::new(session(&[sluice.listen], false).await);
        let ins = ta
            .prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
            .await
            .expect("prepare");
        for i in 0..o.keys {
            ta.execute_unpaged(&ins, (format!("k{i}").as_str(), i as i32))
                .await
                .expect("preload");
        }
        let targets: [(&'static str, Arc<Session>, Option<u32>); 3] = [
            ("direct token-aware", ta.clone(), None),
            ("sluice round-robin", through.clone(), Some(pid)),
            ("direct round-robin", rr.clone(), None),
        ];
        let mut prepared = Vec::new();
        for (_, s, _) in &targets {
            let r = s
                .prepare("SELECT v FROM bench.kv WHERE k = ?")
                .await
                .expect("prepare read");
            let w = s
                .prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
                .await
                .expect("prepare write");
            prepared.push((r, w));
        }
        let mut results = Vec::new();
        for paced in [false, true] {
            for rep in 0..o.reps {
                for (t, (name, s, p)) in targets.iter().enumerate() {
                    for op in [Op::Read, Op::Write] {
                        let stmt = match op {
                            Op::Read => prepared[t].0.clone(),
                            Op::Write => prepared[t].1.clone(),
                        };
                        let r = run(s.clone(), stmt, op, &o, paced, *p, name, rep).await;
                        cluster.clear_records();
                        eprintln!(
                            "[cql-e2e] {} rep {rep} {name:20} {:5}: {:8.0} req/s p50 {:6.0} µs p99 {:6.0} µs errors {}{}",
                            r.phase,
                            r.op,
                            r.throughput(),
                            r.p50_us,
                            r.p99_us,
                            r.errors,
                            r.cpu_us_per_request()
                                .map(|c| format!(" sluice {c:.1} µs CPU/request"))
                                .unwrap_or_default()
                        );
                        results.push(r);
                    }
                }
            }
        }
        results
    });
    report(&o, &results);
    drop(sluice);
}

fn report(o: &Opts, results: &[RunResult]) {
    println!(
        "\nCQL test cluster: {} in-memory nodes, RF {}, {} keys; {} concurrent requests; medians of {} interleaved runs of {:?}; paced = {} req/s in total",
        o.nodes, o.rf, o.keys, o.concurrency, o.reps, o.duration, o.rate
    );
    println!("| phase | op | target | req/s | p50 µs | p99 µs | sluice CPU µs/request | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    let mut summary = Vec::new();
    for phase in ["saturation", "paced"] {
        for op in ["read", "write"] {
            for target in ["direct token-aware", "sluice round-robin", "direct round-robin"] {
                let rs: Vec<&RunResult> = results
                    .iter()
                    .filter(|r| r.phase == phase && r.op == op && r.target == target)
                    .collect();
                if rs.is_empty() {
                    continue;
                }
                let tput = median(rs.iter().map(|r| r.throughput()).collect());
                let p50 = median(rs.iter().map(|r| r.p50_us).collect());
                let p99 = median(rs.iter().map(|r| r.p99_us).collect());
                let cpu = median(rs.iter().filter_map(|r| r.cpu_us_per_request()).collect());
                let errors: usize = rs.iter().map(|r| r.errors).sum();
                println!(
                    "| {phase} | {op} | {target} | {tput:.0} | {p50:.0} | {p99:.0} | {} | {errors} |",
                    if cpu.is_nan() {
                        "-".to_string()
                    } else {
                        format!("{cpu:.1}")
                    }
                );
                summary.push((phase, op, target, tput, p50, p99, cpu));
            }
        }
    }
    println!();
    for op in ["read", "write"] {
        let get = |phase: &str, target: &str| {
            summary
                .iter()
                .find(|s| s.0 == phase && s.1 == op && s.2 == target)
                .copied()
        };
        if let (Some(s), Some(d)) = (
            get("saturation", "sluice round-robin"),
            get("saturation", "direct token-aware"),
        ) {
            println!(
                "{op}: throughput sluice round-robin / direct token-aware = {:.2} (target >= 0.8); sluice CPU {:.1} µs/request (target <= 15)",
                s.3 / d.3,
                s.6
            );
        }
        if let (Some(s), Some(d)) = (
            get("paced", "sluice round-robin"),
            get("paced", "direct token-aware"),
        ) {
            println!(
                "{op}: paced p99 added by sluice = {:.0} µs (sluice {:.0} − direct token-aware {:.0}; target <= 250)",
                s.5 - d.5,
                s.5,
                d.5
            );
        }
    }
    for r in results {
        json.push(format!(
            "{{\"phase\":\"{}\",\"op\":\"{}\",\"target\":\"{}\",\"rep\":{},\"requests\":{},\"errors\":{},\"seconds\":{:.3},\"throughput\":{:.1},\"p50_us\":{},\"p99_us\":{},\"mean_us\":{:.1},\"sluice_cpu_s\":{}}}",
            r.phase,
            r.op,
            r.target,
            r.rep,
            r.requests,
            r.errors,
            r.seconds,
            r.throughput(),
            r.p50_us,
            r.p99_us,
            r.mean_us,
            r.sluice_cpu_s
                .map(|c| format!("{c:.3}"))
                .unwrap_or_else(|| "null".into())
        ));
    }
    let _ = std::fs::create_dir_all(&o.out);
    let path = o.out.join("results.json");
    match std::fs::write(&path, format!("[\n{}\n]\n", json.join(",\n"))) {
        Ok(()) => println!("\nresults: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
