//! End-to-end tests of discovery: the real `sluice` binary finds real PostgreSQL nodes through
//! the fake Kubernetes API server replaying the recorded scenarios (and through a tiny DNS
//! server), and routes writes to whichever node the databases say is the primary.
//!
//! The recorded pod IPs (10.244.x.x) are data: each scenario is rewritten so that every pod
//! address is a 127.0.0.x address where a forwarder listens in front of a test PostgreSQL
//! node, and the endpoint port is the forwarders' common port. Nothing connects to 10.x.

#[path = "../support/mod.rs"]
mod support;

mod dns;
mod failover;
mod forward;
mod mistakes;
mod outage;
mod restart;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_apiserver::{FakeApiServer, Scenario, ADMIN_TOKEN};
use support::{simple_rows, PgCluster, Sluice};
use tokio_postgres::Client;

use forward::Forward;

/// Runs a blocking harness call (starting servers, promoting) without stalling the runtime
/// that serves the fake API server and the forwarders.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A recorded pod and the test node behind it: (recorded IP, loopback IP, PostgreSQL port).
pub type Pod<'a> = (&'a str, Ipv4Addr, u16);

/// The fake API server, the forwarders standing in for pods, and the PostgreSQL nodes.
/// Fields drop in order: sluice first.
pub struct K8sEnv {
    pub sluice: Option<Sluice>,
    pub fake: FakeApiServer,
    pub forwards: Vec<Forward>,
    /// The endpoint port every pod listens on.
    pub port: u16,
    pub cluster: PgCluster,
    kubeconfig: tempfile::TempDir,
}

impl K8sEnv {
    /// Rewrites `scenario` so that each pod's recorded IP becomes its loopback address and
    /// `recorded_port` the forwarders' port; starts the forwarders and the fake API server.
    pub async fn start(
        scenario: Scenario,
        pods: &[Pod<'_>],
        recorded_port: u16,
        cluster: PgCluster,
    ) -> K8sEnv {
        let (port, forwards) = forwarders(pods).await;
        let mut scenario =
            scenario.rewrite(&format!("\"port\":{recorded_port}"), &format!("\"port\":{port}"));
        for (recorded, loopback, _) in pods {
            scenario = scenario.rewrite(&format!("\"{recorded}\""), &format!("\"{loopback}\""));
        }
        let fake = FakeApiServer::start(scenario).await.expect("fake API server");
        let kubeconfig = tempfile::Builder::new()
            .prefix("sluice-kube-")
            .tempdir()
            .expect("temp dir");
        K8sEnv {
            sluice: None,
            fake,
            forwards,
            port,
            cluster,
            kubeconfig,
        }
    }

    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, token: &str) -> String {
        let path = self.kubeconfig.path().join(format!("{token}.yaml"));
        std::fs::write(&path, self.fake.kubeconfig(token)).expect("write kubeconfig");
        path.display().to_string()
    }

    /// Starts sluice with `toml` and `KUBECONFIG` pointing at the fake server.
    pub fn start_sluice(&mut self, toml: &str) -> &Sluice {
        let kubeconfig = self.kubeconfig(ADMIN_TOKEN);
        let sluice = blocking(|| Sluice::start_with_env(toml, &[("KUBECONFIG", &kubeconfig)]));
        self.sluice.insert(sluice)
    }

    pub fn sluice(&self) -> &Sluice {
        self.sluice.as_ref().expect("sluice started")
    }

    /// A client connected through sluice as `app` to database `app`.
    pub async fn client(&self) -> Client {
        support::connect(self.sluice().listen_addr(), "app", "app-secret", "app").await
    }

    /// The address sluice sees for a pod at `loopback`.
    pub fn pod_addr(&self, loopback: Ipv4Addr) -> String {
        format!("{loopback}:{}", self.port)
    }
}

/// One forwarder per pod, all on one port (retrying if a port is taken on some address).
async fn forwarders(pods: &[Pod<'_>]) -> (u16, Vec<Forward>) {
    for _ in 0..10 {
        let port = support::free_port();
        let mut out = Vec::new();
        for (_, ip, pg) in pods {
            match Forward::start(SocketAddr::new((*ip).into(), port), ([127, 0, 0, 1], *pg).into()).await {
                Ok(f) => out.push(f),
                Err(_) => break,
            }
        }
        if out.len() == pods.len() {
            return (port, out);
        }
    }
    panic!("no port free on every pod address");
}

/// The contract file `kubernetes.toml`, unchanged but for its listen and admin ports.
pub fn contract_config() -> (String, u16, u16) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/contract/kubernetes.toml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let (listen, admin) = (support::free_port(), support::free_port());
    let text = text
        .replace("127.0.0.1:6433", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:9932", &format!("127.0.0.1:{admin}"));
    (text, listen, admin)
}

/// A config for one postgres cluster `pg` (user app/app-secret) on free ports, with
/// `cluster_keys` added to its table and `discovery` as its discovery table.
pub fn pg_config(cluster_keys: &str, discovery: &str) -> String {
    let (listen, admin) = (support::free_port(), support::free_port());
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[clusters]]\nname = \"pg\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:{listen}\"\n{cluster_keys}\n\n\
         {discovery}\n\n\
         [[clusters.users]]\nname = \"app\"\npassword = \"app-secret\"\n"
    )
}

/// (in recovery, server port) of a statement run through sluice.
pub async fn where_runs(client: &Client, sql: &str) -> (bool, u16) {
    let rows = simple_rows(client, sql).await;
    let row = rows.last().unwrap_or_else(|| panic!("{sql}: no rows"));
    (row[0] == "t", row[1].parse().expect("port"))
}

/// Where a write lands.
pub async fn write_port(client: &Client) -> u16 {
    let (in_recovery, port) = where_runs(
        client,
        "INSERT INTO k VALUES (DEFAULT) RETURNING pg_is_in_recovery(), inet_server_port()",
    )
    .await;
    assert!(!in_recovery, "a write ran on a standby");
    port
}

/// Where a read lands.
pub async fn read_port(client: &Client) -> u16 {
    where_runs(client, "SELECT pg_is_in_recovery(), inet_server_port()")
        .await
        .1
}

/// Waits until `/topology` shows the node at `address` with `role` and healthy, or panics
/// after `wait` with the topology.
pub fn wait_for_node(sluice: &Sluice, address: &str, role: &str, wait: Duration) -> serde_json::Value {
    let deadline = Instant::now() + wait;
    loop {
        let (nodes, body) = sluice.topology_nodes();
        if let Some(n) = nodes
            .iter()
            .find(|n| n["address"] == address && n["role"] == role && n["healthy"] == true)
        {
            return n.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{address} is not a healthy {role}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
