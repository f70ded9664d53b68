//! The real `sluice` binary as a child process, with its logs captured for assertions.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::http::http_get;
use super::pg::{free_port, PgCluster};

/// A running sluice. Dropping it kills the process.
pub struct Sluice {
    child: Mutex<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

/// A sluice config for `cluster` on fresh ports, returned with (listen port, admin port).
/// `extra` goes inside the `[[clusters]]` table (e.g. `pool_size = 1`); `pool_mode` and
/// `consistency` default to "transaction" and "eventual" unless `extra` sets them. The file
/// ends with the `[[clusters.users]]` entry for `app`, so a test may append more users.
pub fn sluice_config(cluster: &PgCluster, extra: &str) -> (String, u16, u16) {
    let listen = free_port();
    let admin = free_port();
    let mut settings = String::new();
    if !extra.contains("pool_mode") {
        settings.push_str("pool_mode = \"transaction\"\n");
    }
    if !extra.contains("consistency") {
        settings.push_str("consistency = \"eventual\"\n");
    }
    settings.push_str(extra.trim());
    let nodes = cluster
        .node_ports()
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        "[admin]\n\
         listen = \"127.0.0.1:{admin}\"\n\
         \n\
         [[clusters]]\n\
         name = \"app\"\n\
         protocol = \"postgres\"\n\
         listen = \"127.0.0.1:{listen}\"\n\
         {settings}\n\
         \n\
         [clusters.discovery]\n\
         static = [{nodes}]\n\
         \n\
         [[clusters.users]]\n\
         name = \"app\"\n\
         password = \"app-secret\"\n"
    );
    (toml, listen, admin)
}

/// Removes ANSI colour sequences, in case the log formatter emits them into a pipe.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn capture(stream: impl Read + Send + 'static, logs: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            eprintln!("[sluice] {line}");
            logs.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

fn addr_of(value: &toml::Value, what: &str) -> SocketAddr {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("config {what} is not an address: {value:?}"))
}

impl Sluice {
    /// Writes `config_toml` to a file, starts sluice with it and waits (15 s at most) until
    /// `/readyz` answers 200.
    pub fn start(config_toml: &str) -> Sluice {
        Sluice::start_with_env(config_toml, &[])
    }

    /// Like [`Sluice::start`], with extra environment variables (e.g. `KUBECONFIG`).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Sluice {
        let sluice = Sluice::spawn_with_env(config_toml, env);
        sluice.wait_ready(Duration::from_secs(15));
        sluice
    }

    /// Starts sluice without waiting for it to be ready (a test may expect it to fail).
    pub fn spawn_with_env(config_toml: &str, env: &[(&str, &str)]) -> Sluice {
        let parsed: toml::Table = config_toml.parse().expect("test config is valid TOML");
        let admin = addr_of(&parsed["admin"]["listen"], "admin.listen");
        let listen = addr_of(&parsed["clusters"][0]["listen"], "clusters[0].listen");

        let dir = tempfile::Builder::new()
            .prefix("sluice-cfg-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, config_toml).expect("write config");

        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "sluice=debug,info".into()),
            )
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let logs = Arc::new(Mutex::new(Vec::new()));
        capture(child.stdout.take().expect("stdout"), logs.clone());
        capture(child.stderr.take().expect("stderr"), logs.clone());
        Sluice {
            child: Mutex::new(child),
            logs,
            listen,
            admin,
            _dir: dir,
        }
    }

    /// Waits until `/readyz` answers 200; panics with the logs if sluice exits or is not
    /// ready within `wait`.
    pub fn wait_ready(&self, wait: Duration) {
        let (sluice, admin) = (self, self.admin);
        let started = Instant::now();
        let deadline = started + wait;
        loop {
            if let Some(status) = sluice.exit_status() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "sluice exited ({status}) before it was ready; logs:\n{}",
                    sluice.logs().join("\n")
                );
            }
            match http_get(admin, "/readyz") {
                Ok((200, _)) => break,
                Ok(_) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                other => panic!(
                    "sluice not ready after {wait:?} (last /readyz: {other:?}); logs:\n{}",
                    sluice.logs().join("\n")
                ),
            }
        }
        eprintln!("[harness] sluice ready in {:.1?}", started.elapsed());
    }

    /// The process id (to send signals).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Sends a signal by name (`"HUP"`, `"TERM"`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits up to `wait` for sluice to exit.
    pub fn wait_exit(&self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.exit_status() {
                // Let the capture threads drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of one series (`name{labels}`, exactly as exposed) in `/metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
    }

    /// The configuration file sluice was started with (a test may rewrite it and reload).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("sluice.toml")
    }

    /// How sluice ended, if it is no longer running.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    /// Fails the test if sluice is no longer running.
    pub fn assert_running(&self) {
        if let Some(status) = self.exit_status() {
            std::thread::sleep(Duration::from_millis(100));
            let logs = self.logs();
            let tail = &logs[logs.len().saturating_sub(30)..];
            panic!(
                "sluice exited unexpectedly ({status}); last logs:\n{}",
                tail.join("\n")
            );
        }
    }

    /// The PostgreSQL listener clients connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The admin HTTP listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Every log line so far (stdout and stderr, ANSI colours removed).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `GET path` on the admin listener; panics if the request itself fails.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The first cluster's nodes in `GET /topology` (which must answer 200), with the body
    /// for failure messages.
    pub fn topology_nodes(&self) -> (Vec<serde_json::Value>, String) {
        let (status, body) = self.http_get("/topology");
        assert_eq!(status, 200, "/topology: {body}");
        let topo: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let nodes = topo["clusters"][0]["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("no clusters[0].nodes: {body}"))
            .clone();
        (nodes, body)
    }

    /// Fails the test if sluice logged an ERROR line or a panic that contains none of
    /// `allowed`.
    pub fn assert_no_unexpected_errors(&self, allowed: &[&str]) {
        self.assert_running();
        // Give the capture threads a moment to drain what sluice has written.
        std::thread::sleep(Duration::from_millis(100));
        let unexpected: Vec<String> = self
            .logs()
            .into_iter()
            .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
            .filter(|l| !allowed.iter().any(|a| l.contains(a)))
            .collect();
        assert!(
            unexpected.is_empty(),
            "sluice logged unexpected errors:\n{}",
            unexpected.join("\n")
        );
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}
