//! Throwaway PostgreSQL clusters (a primary and streaming replicas) on loopback ports.

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

/// Ports handed out in this process, so parallel tests never pick the same one twice.
static TAKEN_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that nothing listens on right now and no other test in this process
/// has been given.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut taken = TAKEN_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if taken.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// The directory with initdb, pg_ctl, postgres, pg_basebackup, psql and pgbench: the highest
/// /usr/lib/postgresql/N/bin, else `pg_config --bindir`. `SLUICE_PG_BINDIR` overrides both.
pub fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("SLUICE_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return bin;
        }
        let out = Command::new("pg_config").arg("--bindir").output();
        if let Ok(out) = out {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() {
                return dir;
            }
        }
        panic!("no PostgreSQL server binaries found (install the `postgresql` package)");
    })
}

/// Path of a PostgreSQL program, preferring the server's bin dir over $PATH.
pub fn pg_bin(name: &str) -> PathBuf {
    let path = pg_bin_dir().join(name);
    if path.exists() {
        path
    } else {
        PathBuf::from(name)
    }
}

/// uid/gid of the `postgres` OS user when running as root (initdb refuses root), else None.
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg("postgres").output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let me = Command::new("id").arg("-u").output().expect("run id -u");
        if String::from_utf8_lossy(&me.stdout).trim() != "0" {
            return None;
        }
        Some((
            id("-u").expect("running as root needs an OS user `postgres`"),
            id("-g").expect("gid of postgres"),
        ))
    })
}

/// A command for a server-side program, run as the `postgres` OS user when we are root.
fn server_cmd(name: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(pg_bin(name));
    cmd.current_dir(cwd).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read log: {e}>"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One PostgreSQL server of a cluster.
struct Node {
    port: u16,
    data: PathBuf,
    log: PathBuf,
}

/// A primary and `n` streaming replicas, each on its own loopback port, in one temp dir.
/// Dropping it stops every server and removes the files.
pub struct PgCluster {
    dir: TempDir,
    nodes: Vec<Node>,
}

const PG_HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
host all legacy 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
";

/// Role setup; separate commands because CREATE DATABASE cannot run in a transaction block.
const SETUP_SQL: &[&str] = &[
    "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'app-secret'",
    "CREATE DATABASE app OWNER app",
    "SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD 'legacy-secret'",
    "GRANT ALL ON DATABASE app TO legacy",
];

const SETUP_APP_DB_SQL: &[&str] = &["GRANT ALL ON SCHEMA public TO app, legacy"];

impl PgCluster {
    /// Starts a primary and `replicas` streaming replicas, with roles `app` (SCRAM),
    /// `legacy` (md5) and `postgres` (trust), and a database `app`.
    pub fn start(replicas: usize) -> PgCluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .expect("create temp dir");
        if let Some((uid, gid)) = server_user() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let mut cluster = PgCluster {
            dir,
            nodes: Vec::new(),
        };
        cluster.init_primary();
        for i in 0..replicas {
            cluster.add_replica(i);
        }
        eprintln!(
            "[pg] cluster {:?} up in {:.1?}",
            cluster.node_ports(),
            started.elapsed()
        );
        cluster
    }

    fn init_primary(&mut self) {
        let root = self.dir.path().to_path_buf();
        let data = root.join("node0");
        run(
            server_cmd("initdb", &root)
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-N", "-E", "UTF8", "--locale=C"])
                .arg("--auth=trust"),
            "initdb",
        );
        fs::write(data.join("pg_hba.conf"), PG_HBA).expect("write pg_hba.conf");
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        use std::io::Write;
        write!(
            conf,
            "\n# sluice tests\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             hot_standby = on\n\
             fsync = off\n\
             shared_buffers = 16MB\n\
             max_connections = 100\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            root.display()
        )
        .expect("write postgresql.conf");
        drop(conf);
        let port = self.start_node(&data, "node0");
        self.psql_commands(port, "postgres", SETUP_SQL);
        self.psql_commands(port, "app", SETUP_APP_DB_SQL);
    }

    fn add_replica(&mut self, i: usize) {
        let root = self.dir.path().to_path_buf();
        let name = format!("node{}", i + 1);
        let data = root.join(&name);
        let primary = self.primary_port().to_string();
        run(
            server_cmd("pg_basebackup", &root)
                .args(["-h", "127.0.0.1", "-p", &primary, "-U", "postgres", "-D"])
                .arg(&data)
                .args(["-R", "-X", "stream", "-c", "fast"]),
            "pg_basebackup",
        );
        self.start_node(&data, &name);
        let want = i + 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streaming = self.psql(
                self.primary_port(),
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            );
            if streaming.trim().parse::<usize>().unwrap_or(0) >= want {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "replica {name} is not streaming after 30 s; its log:\n{}",
                    tail(&root.join(format!("{name}.log")), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Picks a port and starts the server in `data`, retrying with another port if the one
    /// picked was taken meanwhile (by another process on this machine).
    fn start_node(&mut self, data: &Path, name: &str) -> u16 {
        let root = self.dir.path().to_path_buf();
        let log = root.join(format!("{name}.log"));
        for _attempt in 0..3 {
            let port = free_port();
            let mut conf = fs::read_to_string(data.join("postgresql.conf")).expect("read conf");
            conf.push_str(&format!("port = {port}\n"));
            fs::write(data.join("postgresql.conf"), conf).expect("write conf");
            let out = server_cmd("pg_ctl", &root)
                .args(["-w", "-t", "60", "-D"])
                .arg(data)
                .arg("-l")
                .arg(&log)
                .arg("start")
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                self.nodes.push(Node {
                    port,
                    data: data.to_path_buf(),
                    log,
                });
                return port;
            }
            let log_tail = tail(&log, 40);
            if !log_tail.contains("could not bind") && !log_tail.contains("already in use") {
                panic!(
                    "{name} failed to start on port {port}: {}\n--- log tail ---\n{log_tail}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        panic!("{name}: no free port after 3 attempts:\n{}", tail(&log, 40));
    }

    /// Runs SQL with psql as superuser `postgres` over TCP; returns unaligned, tuples-only
    /// output.
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> String {
        self.psql_commands(port, db, &[sql])
    }

    /// Like [`PgCluster::psql`] with several `-c` commands, each its own transaction.
    pub fn psql_commands(&self, port: u16, db: &str, commands: &[&str]) -> String {
        let mut cmd = Command::new(pg_bin("psql"));
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-d", db])
            .env_remove("PGPASSWORD");
        for sql in commands {
            cmd.args(["-c", sql]);
        }
        let out = run(&mut cmd, &format!("psql on port {port}: {commands:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The primary's port (the node that started as primary).
    pub fn primary_port(&self) -> u16 {
        self.nodes[0].port
    }

    /// The replicas' ports, in creation order.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.nodes[1..].iter().map(|n| n.port).collect()
    }

    /// Every node's port, primary first.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The temp dir with data dirs and server logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// The tail of a node's server log.
    pub fn log_tail(&self, port: u16, lines: usize) -> String {
        tail(&self.node(port).log, lines)
    }

    /// Promotes replica `i` (0-based among the replicas) and waits until it accepts writes.
    pub fn promote(&self, i: usize) {
        let node = &self.nodes[i + 1];
        run(
            server_cmd("pg_ctl", self.dir.path())
                .args(["promote", "-w", "-t", "30", "-D"])
                .arg(&node.data),
            "pg_ctl promote",
        );
    }

    /// Stops a node cleanly (`pg_ctl stop -m fast`).
    pub fn stop_node(&self, port: u16) {
        let node = self.node(port);
        run(
            server_cmd("pg_ctl", self.dir.path())
                .args(["stop", "-w", "-m", "fast", "-D"])
                .arg(&node.data),
            "pg_ctl stop",
        );
    }

    /// Kills a node's postmaster with SIGKILL, as a crash would.
    pub fn kill9(&self, port: u16) {
        let node = self.node(port);
        let pid_file = fs::read_to_string(node.data.join("postmaster.pid")).expect("postmaster.pid");
        let pid = pid_file.lines().next().expect("pid line").trim().to_string();
        run(Command::new("kill").args(["-9", &pid]), "kill -9 postmaster");
    }

    /// The SCRAM verifier of `role` as `pg_authid` holds it (read on the primary).
    pub fn verifier(&self, role: &str) -> String {
        let verifier = self
            .psql(
                self.primary_port(),
                "postgres",
                &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"),
            )
            .trim()
            .to_string();
        assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
        verifier
    }

    /// A connection to database `app` as superuser `postgres`, straight to the node.
    pub async fn superuser_client(&self, port: u16) -> Client {
        let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=app connect_timeout=5");
        let (client, connection) = tokio_postgres::connect(&conn, NoTls)
            .await
            .unwrap_or_else(|e| panic!("superuser connect to port {port}: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Waits (up to 15 s) until every replica has replayed the primary's current WAL position.
    pub async fn wait_replicated(&self) {
        let primary = self.superuser_client(self.primary_port()).await;
        let row = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn");
        let lsn: String = row.get(0);
        let deadline = Instant::now() + Duration::from_secs(15);
        for port in self.replica_ports() {
            let replica = self.superuser_client(port).await;
            loop {
                let row = replica
                    .query_one(
                        "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                        &[&lsn],
                    )
                    .await
                    .expect("pg_last_wal_replay_lsn");
                if row.get::<_, bool>(0) {
                    break;
                }
                if Instant::now() > deadline {
                    panic!("replica {port} has not replayed {lsn} after 15 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl PgCluster {
    /// Makes the primary wait for a replica's flush before it acknowledges a commit
    /// (`synchronous_standby_names = '*'`), and waits (15 s at most) until a replica is
    /// synchronous. Only the primary's configuration changes: a promoted replica commits alone.
    pub fn make_synchronous(&self) {
        let port = self.primary_port();
        self.psql_commands(
            port,
            "postgres",
            &[
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "SELECT pg_reload_conf()",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let sync = self.psql(
                port,
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            );
            if sync.trim().parse::<usize>().unwrap_or(0) >= 1 {
                return;
            }
            assert!(Instant::now() < deadline, "no synchronous replica after 15 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The postmaster's pid (first line of postmaster.pid).
    pub fn postmaster_pid(&self, port: u16) -> u32 {
        let node = self.node(port);
        let pid_file = fs::read_to_string(node.data.join("postmaster.pid")).expect("postmaster.pid");
        pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid on the first line of postmaster.pid")
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`, ...) to every process of a node: the postmaster and
    /// its children (backends, walreceiver, ...), so that `STOP` freezes the node as a hung
    /// machine would, established connections included. The postmaster is signalled first, so
    /// a stopped one cannot fork a child that the list misses.
    pub fn signal_node(&self, port: u16, signal: &str) {
        let postmaster = self.postmaster_pid(port).to_string();
        let kill = |pids: &[String]| {
            Command::new("kill")
                .arg("-s")
                .arg(signal)
                .args(pids)
                .status()
                .expect("run kill")
                .success()
        };
        assert!(
            kill(std::slice::from_ref(&postmaster)),
            "kill -s {signal} {postmaster} failed"
        );
        let out = run(
            Command::new("ps").args(["-o", "pid=", "--ppid", &postmaster]),
            "list the postmaster's children",
        );
        let children: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        // A child may exit meanwhile; the others are signalled all the same.
        if !children.is_empty() {
            kill(&children);
        }
    }

    /// Starts a node again that was stopped or killed (crash recovery runs first). After a
    /// SIGKILL the old postmaster's children hold its shared memory until they notice and
    /// exit, so a start is retried for up to 10 s.
    pub fn start_stopped(&self, port: u16) {
        let node = self.node(port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = server_cmd("pg_ctl", self.dir.path())
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&node.data)
                .arg("-l")
                .arg(&node.log)
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pg_ctl start failed: {}\n--- log tail ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&node.log, 20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts a node that was stopped cleanly as a streaming replica of the node on
    /// `primary` (the old primary after a switchover follows the promoted one on its new
    /// timeline; a clean shutdown leaves nothing to rewind).
    pub fn follow(&self, port: u16, primary: u16) {
        let node = self.node(port);
        let conf = node.data.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={primary} user=postgres'\n"
        ));
        fs::write(&conf, text).expect("write postgresql.auto.conf");
        fs::write(node.data.join("standby.signal"), "").expect("write standby.signal");
        if let Some((uid, gid)) = server_user() {
            for f in [conf, node.data.join("standby.signal")] {
                std::os::unix::fs::chown(&f, Some(uid), Some(gid)).expect("chown");
            }
        }
        self.start_stopped(port);
    }

    /// Restarts a node (`pg_ctl restart -m fast`): every connection to it is closed.
    pub fn restart_node(&self, port: u16) {
        let node = self.node(port);
        run(
            server_cmd("pg_ctl", self.dir.path())
                .args(["restart", "-w", "-t", "60", "-m", "fast", "-D"])
                .arg(&node.data)
                .arg("-l")
                .arg(&node.log),
            "pg_ctl restart",
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = server_cmd("pg_ctl", self.dir.path())
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(&node.data)
                .output();
        }
    }
}
