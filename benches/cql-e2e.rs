//! End-to-end CQL load: prepared reads and writes against the CQL test cluster
//! (`tests/cql-cluster`, in-memory nodes on 127.0.0.1..N), straight to the cluster with a
//! token-aware and a round-robin scylla driver, and through `target/release/sluice` with a
//! round-robin driver that knows only sluice (and, with `--before PATH`, through a second
//! sluice binary too, e.g. one built from main, for before/after ratios in the same run). Runs
//! are interleaved and repeated; the table shows medians of throughput, p50/p99 latency,
//! sluice's CPU time per request (utime + stime from /proc/PID/stat around each run) and its
//! context switches per request (voluntary + involuntary, summed over its threads from
//! /proc/PID/task/*/status around each run).
//!
//! ```text
//! cargo build --release --bin sluice
//! cargo bench --bench cql-e2e -- [--duration S] [--reps N] [--concurrency C] [--rate R]
//!                                [--nodes N] [--rf RF] [--strategy simple|nts] [--tokens T]
//!                                [--keys K] [--sluice PATH]
//!                                [--before PATH] [--haproxy PATH] [--pin both|pinned|unpinned]
//!                                [--phases saturation,paced] [--out DIR]
//! ```
//!
//! With `--haproxy PATH`, HAProxy in TCP mode (one frontend per node, placed like sluice) is
//! measured too, with a token-aware driver that reaches every node through it (an address
//! translator maps each node to its frontend): the ceiling of any transparent proxy here, as
//! each request takes the same extra hop through another process that sluice's does, with
//! no parsing at all.
//!
//! Two phases: saturation (C concurrent requests in flight, as fast as possible) and paced
//! (C workers sharing R requests per second, below saturation) for the added p99 latency.
//! Two placements (`--pin`, both by default, interleaved run by run): `unpinned` (the
//! scheduler places everything on every CPU) and `pinned` (sluice on CPU 0, started there
//! with `taskset -c 0`, so it sizes its runtime for one CPU; this process, i.e. the load
//! generator and the test cluster, moved to CPU 1 with `taskset -a -p` for the run). Each
//! placement has its own sluice processes. Results go to `--out` (default `target/cql-e2e`)
//! as results.json. Without `--bench` (as under `cargo test --all-targets`) it only prints
//! how to run it.

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
    /// The bench keyspace's replication: SimpleStrategy, or NetworkTopologyStrategy (what
    /// production keyspaces use).
    nts: bool,
    /// Tokens per node (vnodes).
    tokens: usize,
    keys: usize,
    sluice: PathBuf,
    before: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    pins: Vec<Pin>,
    phases: Vec<bool>,
    out: PathBuf,
}

/// Where the processes run.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Pin {
    /// Everywhere the scheduler likes.
    Unpinned,
    /// sluice on CPU 0; the load generator and the test cluster (this process) on CPU 1.
    Pinned,
}

impl Pin {
    fn name(self) -> &'static str {
        match self {
            Pin::Unpinned => "unpinned",
            Pin::Pinned => "pinned",
        }
    }
}

const USAGE: &str = "cargo bench --bench cql-e2e -- [--duration S] [--reps N] [--concurrency C] [--rate R]
                               [--nodes N] [--rf RF] [--strategy simple|nts] [--tokens T]
                               [--keys K] [--sluice PATH]
                               [--before PATH] [--haproxy PATH] [--pin both|pinned|unpinned]
                               [--phases saturation,paced] [--out DIR]
(or the bench binary itself, target/release/deps/cql_e2e-*, with --bench first; see the
header of benches/cql-e2e.rs)";

fn opts() -> Option<Opts> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        duration: Duration::from_secs(5),
        reps: 3,
        concurrency: 16,
        rate: 2000.0,
        nodes: 3,
        rf: 2,
        nts: false,
        tokens: 8,
        keys: 10_000,
        sluice: root.join("target/release/sluice"),
        before: None,
        haproxy: None,
        pins: vec![Pin::Unpinned, Pin::Pinned],
        phases: vec![false, true],
        out: root.join("target/cql-e2e"),
    };
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--bench" => bench = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--duration" => o.duration = Duration::from_secs_f64(v("--duration").parse().expect("seconds")),
            "--reps" => o.reps = v("--reps").parse().expect("count"),
            "--concurrency" => o.concurrency = v("--concurrency").parse().expect("count"),
            "--rate" => o.rate = v("--rate").parse().expect("requests per second"),
            "--nodes" => o.nodes = v("--nodes").parse().expect("count"),
            "--rf" => o.rf = v("--rf").parse().expect("count"),
            "--strategy" => {
                o.nts = match v("--strategy").as_str() {
                    "simple" => false,
                    "nts" => true,
                    other => panic!("--strategy {other:?}: simple or nts"),
                }
            }
            "--tokens" => o.tokens = v("--tokens").parse().expect("count"),
            "--keys" => o.keys = v("--keys").parse().expect("count"),
            "--sluice" => o.sluice = v("--sluice").into(),
            "--before" => o.before = Some(v("--before").into()),
            "--haproxy" => o.haproxy = Some(v("--haproxy").into()),
            "--pin" => {
                o.pins = match v("--pin").as_str() {
                    "both" => vec![Pin::Unpinned, Pin::Pinned],
                    "pinned" => vec![Pin::Pinned],
                    "unpinned" => vec![Pin::Unpinned],
                    other => panic!("--pin {other:?}: both, pinned or unpinned"),
                }
            }
            "--phases" => {
                o.phases = v("--phases")
                    .split(',')
                    .map(|p| match p {
                        "saturation" => false,
                        "paced" => true,
                        other => panic!("--phases: unknown phase {other:?}"),
                    })
                    .collect()
            }
            "--out" => o.out = v("--out").into(),
            other => panic!("unknown argument {other:?} (see the header of benches/cql-e2e.rs)"),
        }
    }
    bench.then_some(o)
}

/// A proxy child process (sluice or HAProxy); killed on drop.
struct SluiceProc {
    child: Child,
    /// Where clients connect: sluice's listener, or HAProxy's frontend for each node.
    listen: Vec<SocketAddr>,
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

fn start_sluice(binary: &std::path::Path, pin: Pin, cluster: &TestCluster) -> SluiceProc {
    assert!(
        binary.exists(),
        "no sluice binary at {} (cargo build --release --bin sluice)",
        binary.display()
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
    let child = placed(binary, pin)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sluice");
    wait_listening(&[listen], "sluice");
    SluiceProc {
        child,
        listen: vec![listen],
        _dir: dir,
    }
}

/// A command running `binary` where `pin` places a proxy (CPU 0 when pinned).
fn placed(binary: &std::path::Path, pin: Pin) -> Command {
    match pin {
        Pin::Unpinned => Command::new(binary),
        Pin::Pinned => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg("0").arg(binary);
            c
        }
    }
}

fn wait_listening(addrs: &[SocketAddr], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while addrs.iter().any(|a| std::net::TcpStream::connect(a).is_err()) {
        assert!(Instant::now() < deadline, "{what} did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// HAProxy in TCP mode, one frontend per node of `cluster` (in node order), placed as `pin`
/// says; its thread count is HAProxy's default (one per CPU it may use).
fn start_haproxy(binary: &std::path::Path, pin: Pin, cluster: &TestCluster, nodes: usize) -> SluiceProc {
    let dir = tempfile::tempdir().expect("temp dir");
    let listen: Vec<SocketAddr> = (0..nodes)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("address"))
        .collect();
    let mut config = String::from(
        "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n",
    );
    for (i, front) in listen.iter().enumerate() {
        config += &format!(
            "\nlisten node{i}\n    bind {front}\n    server node{i} {}\n",
            cluster.address(i)
        );
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).expect("write config");
    let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log file");
    let child = placed(binary, pin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start haproxy");
    wait_listening(&listen, "haproxy");
    SluiceProc {
        child,
        listen,
        _dir: dir,
    }
}

/// Moves every thread of this process (load generator, test cluster) for a run.
fn place_self(pin: Pin) {
    let cpus = match pin {
        Pin::Unpinned => "0-1",
        Pin::Pinned => "1",
    };
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -a -p -c {cpus} failed");
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
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

/// Context switches of every thread of `pid` so far: (voluntary, involuntary), from
/// /proc/PID/task/*/status (/proc/PID/status counts the main thread only).
fn context_switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            let count = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(n) = count("voluntary_ctxt_switches:") {
                total.0 += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                total.1 += n;
            }
        }
    }
    total
}

async fn session(nodes: &[SocketAddr], token_aware: bool) -> Session {
    session_via(nodes, token_aware, None).await
}

/// `session`, reaching the nodes the cluster names at the addresses `via` maps them to.
async fn session_via(
    nodes: &[SocketAddr],
    token_aware: bool,
    via: Option<std::collections::HashMap<SocketAddr, SocketAddr>>,
) -> Session {
    let policy = DefaultPolicy::builder().token_aware(token_aware).build();
    let profile = ExecutionProfile::builder().load_balancing_policy(policy).build();
    let mut b = SessionBuilder::new().default_execution_profile_handle(profile.into_handle());
    if let Some(map) = via {
        b = b.address_translator(Arc::new(map));
    }
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
    pin: Pin,
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
    /// sluice's context switches during the run: (voluntary, involuntary).
    sluice_ctxsw: Option<(u64, u64)>,
    /// The machine's busy fraction during the run (all CPUs).
    busy: f64,
}

impl RunResult {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn cpu_us_per_request(&self) -> Option<f64> {
        self.sluice_cpu_s.map(|c| c * 1e6 / self.requests.max(1) as f64)
    }

    /// sluice's context switches (voluntary + involuntary) per request.
    fn ctxsw_per_request(&self) -> Option<f64> {
        self.sluice_ctxsw
            .map(|(v, n)| (v + n) as f64 / self.requests.max(1) as f64)
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
    let ctx0 = sluice_pid.map(context_switches);
    let machine0 = machine_jiffies();
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
    let machine1 = machine_jiffies();
    let busy = (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64;
    let cpu = match (sluice_pid, cpu0) {
        (Some(p), Some(c0)) => Some(cpu_seconds(p) - c0),
        _ => None,
    };
    let ctxsw = match (sluice_pid, ctx0) {
        (Some(p), Some((v0, n0))) => {
            let (v1, n1) = context_switches(p);
            Some((v1.saturating_sub(v0), n1.saturating_sub(n0)))
        }
        _ => None,
    };
    lat.sort_unstable();
    let q = |x: f64| {
        lat.get(((lat.len() as f64 * x) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    RunResult {
        pin: Pin::Unpinned,
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
        sluice_ctxsw: ctxsw,
        busy,
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

/// A driver session and, through sluice, the sluice process it goes through.
struct Target {
    name: &'static str,
    session: Arc<Session>,
    sluice_pid: Option<u32>,
    read: PreparedStatement,
    write: PreparedStatement,
}

async fn target(name: &'static str, session: Arc<Session>, sluice_pid: Option<u32>) -> Target {
    let read = session
        .prepare("SELECT v FROM bench.kv WHERE k = ?")
        .await
        .expect("prepare read");
    let write = session
        .prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
        .await
        .expect("prepare write");
    Target {
        name,
        session,
        sluice_pid,
        read,
        write,
    }
}

const DIRECT_TA: &str = "direct token-aware";
const DIRECT_RR: &str = "direct round-robin";
const SLUICE: &str = "sluice round-robin";
const BEFORE: &str = "sluice-before round-robin";
const HAPROXY: &str = "haproxy L4 token-aware";

fn main() {
    let Some(o) = opts() else {
        eprintln!("cql-e2e: run it with `cargo bench --bench cql-e2e -- [options]` (see benches/cql-e2e.rs)");
        return;
    };
    let cluster = TestCluster::start(ClusterSpec::new(o.nodes, o.tokens)).expect("CQL test cluster");
    let mut binaries: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(b) = &o.before {
        binaries.push((BEFORE, b.clone()));
    }
    binaries.push((SLUICE, o.sluice.clone()));
    let mut procs: Vec<(Pin, &'static str, SluiceProc)> = Vec::new();
    for &pin in &o.pins {
        for (name, bin) in &binaries {
            procs.push((pin, *name, start_sluice(bin, pin, &cluster)));
        }
        if let Some(h) = &o.haproxy {
            procs.push((pin, HAPROXY, start_haproxy(h, pin, &cluster, o.nodes)));
        }
    }
    let direct: Vec<SocketAddr> = (0..o.nodes).map(|i| cluster.address(i)).collect();
    eprintln!(
        "[cql-e2e] {} nodes (RF {}) at {direct:?}; load average {}",
        o.nodes,
        o.rf,
        loadavg()
    );
    for (pin, name, p) in &procs {
        eprintln!(
            "[cql-e2e] {name} ({}) pid {} on {:?}",
            pin.name(),
            p.child.id(),
            p.listen
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let load_before = loadavg();
    let results = rt.block_on(async {
        let ta = Arc::new(session(&direct, true).await);
        let replication = if o.nts {
            // The test cluster's nodes are all in `datacenter1`.
            format!("{{'class': 'NetworkTopologyStrategy', 'datacenter1': {}}}", o.rf)
        } else {
            format!("{{'class': 'SimpleStrategy', 'replication_factor': {}}}", o.rf)
        };
        ta.query_unpaged(
            format!("CREATE KEYSPACE bench WITH replication = {replication}"),
            &[],
        )
        .await
        .expect("create keyspace");
        ta.query_unpaged("CREATE TABLE bench.kv (k text PRIMARY KEY, v int)", &[])
            .await
            .expect("create table");
        ta.await_schema_agreement().await.expect("schema agreement");
        let rr = Arc::new(session(&direct, false).await);
        let ins = ta
            .prepare("INSERT INTO bench.kv (k, v) VALUES (?, ?)")
            .await
            .expect("prepare");
        for i in 0..o.keys {
            ta.execute_unpaged(&ins, (format!("k{i}").as_str(), i as i32))
                .await
                .expect("preload");
        }
        // Per placement: the direct sessions, then each sluice's.
        let mut targets: Vec<(Pin, Vec<Target>)> = Vec::new();
        for &pin in &o.pins {
            let mut ts = vec![target(DIRECT_TA, ta.clone(), None).await];
            for (p, name, proc_) in &procs {
                if *p == pin {
                    let s = if *name == HAPROXY {
                        // A peer's address is its IP with the contact point's port (the test
                        // cluster, like Cassandra's system.peers, lists no port): both forms
                        // map to the node's frontend.
                        let contact = proc_.listen[0].port();
                        let via = direct
                            .iter()
                            .zip(&proc_.listen)
                            .flat_map(|(n, f)| [(*n, *f), (SocketAddr::new(n.ip(), contact), *f)])
                            .collect();
                        Arc::new(session_via(&proc_.listen[..1], true, Some(via)).await)
                    } else {
                        Arc::new(session(&proc_.listen, false).await)
                    };
                    ts.push(target(name, s, Some(proc_.child.id())).await);
                }
            }
            ts.push(target(DIRECT_RR, rr.clone(), None).await);
            targets.push((pin, ts));
        }
        let mut results = Vec::new();
        for &paced in &o.phases {
            for rep in 0..o.reps {
                for (pin, ts) in &targets {
                    place_self(*pin);
                    for t in ts {
                        for op in [Op::Read, Op::Write] {
                            let stmt = match op {
                                Op::Read => t.read.clone(),
                                Op::Write => t.write.clone(),
                            };
                            let mut r =
                                run(t.session.clone(), stmt, op, &o, paced, t.sluice_pid, t.name, rep).await;
                            r.pin = *pin;
                            cluster.clear_records();
                            eprintln!(
                                "[cql-e2e] {} rep {rep} {:8} {:25} {:5}: {:8.0} req/s p50 {:6.0} µs p99 {:6.0} µs errors {} busy {:.2}{}{}",
                                r.phase,
                                pin.name(),
                                t.name,
                                r.op,
                                r.throughput(),
                                r.p50_us,
                                r.p99_us,
                                r.errors,
                                r.busy,
                                r.cpu_us_per_request()
                                    .map(|c| format!(" sluice {c:.1} µs CPU/request"))
                                    .unwrap_or_default(),
                                r.ctxsw_per_request()
                                    .map(|c| format!(", {c:.2} context switches/request"))
                                    .unwrap_or_default()
                            );
                            results.push(r);
                        }
                    }
                }
            }
        }
        place_self(Pin::Unpinned);
        results
    });
    println!(
        "\nload average (1, 5, 15 min) before the runs: {load_before}; after: {}",
        loadavg()
    );
    report(&o, &results);
    drop(procs);
}

fn median_of<'a>(rs: impl Iterator<Item = &'a RunResult>, f: impl Fn(&RunResult) -> Option<f64>) -> f64 {
    median(rs.filter_map(f).collect())
}

/// The median over repetitions of `f(a) / f(b)`, `a` and `b` measured in the same repetition.
fn ratio(results: &[RunResult], a: Sel, b: Sel, f: impl Fn(&RunResult) -> Option<f64>) -> f64 {
    let reps = results.iter().map(|r| r.rep).max().map_or(0, |m| m + 1);
    let find = |s: Sel, rep: usize| {
        results
            .iter()
            .find(|r| r.rep == rep && r.phase == s.0 && r.op == s.1 && r.pin == s.2 && r.target == s.3)
    };
    median(
        (0..reps)
            .filter_map(|rep| {
                let (x, y) = (find(a, rep)?, find(b, rep)?);
                Some(f(x)? / f(y)?)
            })
            .collect(),
    )
}

/// (phase, op, placement, target).
type Sel<'a> = (&'a str, &'a str, Pin, &'a str);

fn report(o: &Opts, results: &[RunResult]) {
    println!(
        "\nCQL test cluster: {} in-memory nodes × {} tokens, {} RF {}, {} keys; {} concurrent requests; medians of {} interleaved runs of {:?}; paced = {} req/s in total",
        o.nodes,
        o.tokens,
        if o.nts { "NetworkTopologyStrategy" } else { "SimpleStrategy" },
        o.rf,
        o.keys,
        o.concurrency,
        o.reps,
        o.duration,
        o.rate
    );
    println!("| phase | op | placement | target | req/s | p50 µs | p99 µs | proxy CPU µs/request | proxy context switches/request | machine busy | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let targets = [DIRECT_TA, BEFORE, SLUICE, HAPROXY, DIRECT_RR];
    for phase in ["saturation", "paced"] {
        for op in ["read", "write"] {
            for &pin in &o.pins {
                for target in targets {
                    let rs: Vec<&RunResult> = results
                        .iter()
                        .filter(|r| r.phase == phase && r.op == op && r.pin == pin && r.target == target)
                        .collect();
                    if rs.is_empty() {
                        continue;
                    }
                    let tput = median_of(rs.iter().copied(), |r| Some(r.throughput()));
                    let p50 = median_of(rs.iter().copied(), |r| Some(r.p50_us));
                    let p99 = median_of(rs.iter().copied(), |r| Some(r.p99_us));
                    let cpu = median_of(rs.iter().copied(), RunResult::cpu_us_per_request);
                    let ctx = median_of(rs.iter().copied(), RunResult::ctxsw_per_request);
                    let busy = median_of(rs.iter().copied(), |r| Some(r.busy));
                    let errors: usize = rs.iter().map(|r| r.errors).sum();
                    println!(
                        "| {phase} | {op} | {} | {target} | {tput:.0} | {p50:.0} | {p99:.0} | {} | {} | {busy:.2} | {errors} |",
                        pin.name(),
                        if cpu.is_nan() {
                            "-".to_string()
                        } else {
                            format!("{cpu:.1}")
                        },
                        if ctx.is_nan() {
                            "-".to_string()
                        } else {
                            format!("{ctx:.2}")
                        }
                    );
                }
            }
        }
    }
    println!("\nRatios (medians over repetitions of ratios measured in the same repetition):");
    let tput = |r: &RunResult| Some(r.throughput());
    let cpu = RunResult::cpu_us_per_request;
    let ctx = RunResult::ctxsw_per_request;
    for &pin in &o.pins {
        for op in ["read", "write"] {
            let sat = |t| ("saturation", op, pin, t);
            let paced = |t| ("paced", op, pin, t);
            let p = pin.name();
            let mut line = format!(
                "{p:8} {op:5}: throughput sluice / direct token-aware = {:.2} (target >= 0.8)",
                ratio(results, sat(SLUICE), sat(DIRECT_TA), tput)
            );
            if o.haproxy.is_some() {
                line += &format!(
                    "; haproxy L4 token-aware / direct token-aware = {:.2}, sluice / haproxy = {:.2}",
                    ratio(results, sat(HAPROXY), sat(DIRECT_TA), tput),
                    ratio(results, sat(SLUICE), sat(HAPROXY), tput),
                );
            }
            if o.before.is_some() {
                line += &format!(
                    "; before: {:.2}; after/before throughput {:.2}, CPU per request {:.2}, context switches per request {:.2}",
                    ratio(results, sat(BEFORE), sat(DIRECT_TA), tput),
                    ratio(results, sat(SLUICE), sat(BEFORE), tput),
                    ratio(results, sat(SLUICE), sat(BEFORE), cpu),
                    ratio(results, sat(SLUICE), sat(BEFORE), ctx),
                );
            }
            let sl: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.phase == "saturation" && r.op == op && r.pin == pin && r.target == SLUICE)
                .collect();
            line += &format!(
                "; sluice CPU {:.1} µs/request (target <= 6), {:.2} context switches/request",
                median_of(sl.iter().copied(), cpu),
                median_of(sl.iter().copied(), ctx)
            );
            println!("{line}");
            let added = |t| {
                let d = |r: &RunResult| Some(r.p99_us);
                let x: Vec<&RunResult> = results
                    .iter()
                    .filter(|r| (r.phase, r.op, r.pin, r.target) == paced(t))
                    .collect();
                let y: Vec<&RunResult> = results
                    .iter()
                    .filter(|r| (r.phase, r.op, r.pin, r.target) == paced(DIRECT_TA))
                    .collect();
                median_of(x.into_iter(), d) - median_of(y.into_iter(), d)
            };
            if results.iter().any(|r| r.phase == "paced") {
                let mut line = format!(
                    "{p:8} {op:5}: paced p99 added by sluice = {:.0} µs (target <= 250)",
                    added(SLUICE)
                );
                if o.before.is_some() {
                    line += &format!("; before: {:.0} µs", added(BEFORE));
                }
                println!("{line}");
            }
        }
    }
    let json: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{{\"phase\":\"{}\",\"op\":\"{}\",\"placement\":\"{}\",\"target\":\"{}\",\"rep\":{},\"requests\":{},\"errors\":{},\"seconds\":{:.3},\"throughput\":{:.1},\"p50_us\":{},\"p99_us\":{},\"mean_us\":{:.1},\"sluice_cpu_s\":{},\"sluice_voluntary_ctxt_switches\":{},\"sluice_nonvoluntary_ctxt_switches\":{},\"busy\":{:.3}}}",
                r.phase,
                r.op,
                r.pin.name(),
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
                    .unwrap_or_else(|| "null".into()),
                r.sluice_ctxsw
                    .map(|(v, _)| v.to_string())
                    .unwrap_or_else(|| "null".into()),
                r.sluice_ctxsw
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_else(|| "null".into()),
                r.busy
            )
        })
        .collect();
    let _ = std::fs::create_dir_all(&o.out);
    let path = o.out.join("results.json");
    match std::fs::write(&path, format!("[\n{}\n]\n", json.join(",\n"))) {
        Ok(()) => println!("\nresults: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}
