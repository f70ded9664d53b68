//! `sluice check --online`: connects to each cluster's discovery source and to every node it
//! finds, and prints what it found, naming what is wrong.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::metrics::Metrics;
use crate::config::{ClusterConfig, Config, Discovery, Protocol};
use crate::discovery;

/// How long discovery may take to find the nodes.
const DISCOVERY_WAIT: Duration = Duration::from_secs(15);

/// Checks every cluster of `config` against the real world; prints one line per finding.
/// Returns whether nothing is wrong.
pub fn online(config: &Config) -> bool {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            println!("error: cannot start the runtime: {e}");
            return false;
        }
    };
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let mut ok = true;
        for c in &config.clusters {
            ok &= cluster(c, &metrics).await;
        }
        ok
    })
}

async fn cluster(c: &ClusterConfig, metrics: &Arc<Metrics>) -> bool {
    let source = match &c.discovery {
        Discovery::Static(_) => "static",
        Discovery::Kubernetes(_) => "kubernetes",
        Discovery::Dns(_) => "dns",
    };
    println!("cluster {:?}: {source} discovery", c.name);
    let mut feed = match discovery::start(&c.name, &c.discovery, metrics).await {
        Ok(f) => f,
        Err(e) => {
            println!("  error: {e}");
            return false;
        }
    };
    let members = feed.synced(DISCOVERY_WAIT).await;
    let mut ok = true;
    if let Some((error, _)) = feed.status.failing() {
        println!("  error: the discovery source is failing: {error}");
        ok = false;
    }
    for problem in feed.status.problems() {
        println!("  error: {problem}");
        ok = false;
    }
    let Some(members) = members else {
        println!("  error: discovery found no complete view within {DISCOVERY_WAIT:?}");
        return false;
    };
    if members.is_empty() {
        println!("  error: discovery found no nodes");
        return false;
    }
    println!("  {} node(s):", members.len());
    for m in &members {
        let mut place = Vec::new();
        if let Some(z) = &m.zone {
            place.push(format!("zone {z}"));
        }
        if let Some(n) = &m.node {
            place.push(format!("node {n}"));
        }
        if let Some(r) = m.labeled_role {
            place.push(format!("labelled {r:?}"));
        }
        let place = if place.is_empty() {
            String::new()
        } else {
            format!(" ({})", place.join(", "))
        };
        match tokio::time::timeout(c.connect_timeout, speaks(c.protocol(), &m.address)).await {
            Ok(Ok(what)) => println!("  node {} at {}{place}: {what}", m.id, m.address),
            Ok(Err(e)) => {
                println!("  error: node {} at {}{place}: {e}", m.id, m.address);
                ok = false;
            }
            Err(_) => {
                println!(
                    "  error: node {} at {}{place}: no answer within {:?}",
                    m.id, m.address, c.connect_timeout
                );
                ok = false;
            }
        }
    }
    ok
}

/// Connects to `address` and asks the cheapest question of its protocol: a PostgreSQL
/// SSLRequest (answered `S` or `N`), a CQL OPTIONS (answered SUPPORTED).
async fn speaks(protocol: Protocol, address: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (request, what): (&[u8], _) = match protocol {
        Protocol::Postgres => (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "PostgreSQL"),
        Protocol::Cql => (&[0x04, 0, 0, 0, 0x05, 0, 0, 0, 0], "CQL"),
    };
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut head = [0u8; 9];
    let want = if protocol == Protocol::Postgres { 1 } else { 9 };
    stream
        .read_exact(&mut head[..want])
        .await
        .map_err(|e| format!("connected, but no {what} answer: {e}"))?;
    match protocol {
        Protocol::Postgres => match head[0] {
            b'S' => Ok("reachable, speaks PostgreSQL (TLS offered)".into()),
            b'N' => Ok("reachable, speaks PostgreSQL (no TLS)".into()),
            other => Err(format!(
                "connected, but the answer ({other:#04x}) is not PostgreSQL's"
            )),
        },
        Protocol::Cql => match (head[0] & 0x80, head[4]) {
            (0x80, 0x06) => Ok("reachable, speaks CQL".into()),
            _ => Err("connected, but the answer is not a CQL SUPPORTED".into()),
        },
    }
}
