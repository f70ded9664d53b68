//! Serves a recorded scenario for manual runs of sluice against a "Kubernetes" API:
//!
//! ```text
//! cargo run -p k8s-apiserver -- --scenario cnpg-failover --listen 127.0.0.1:6443 \
//!     --rewrite '"10.244.1.11"="127.0.0.2"' --kubeconfig /tmp/kubeconfig
//! KUBECONFIG=/tmp/kubeconfig sluice --config ../shared/contract/kubernetes.toml
//! ```
//!
//! Then type commands on stdin: `next` (one recorded step), `advance RV`, `all`, `bookmark`,
//! `expire` (compact: watches get 410), `down` / `up` (an outage), `rv`, `quit`.

use std::io::BufRead;
use std::net::SocketAddr;

use k8s_apiserver::{FakeApiServer, Scenario, ADMIN_TOKEN};

const USAGE: &str =
    "usage: k8s-apiserver --scenario cnpg-failover|patroni-switchover|patroni-bootstrap|cassandra-ring \
[--listen ADDR] [--rewrite FROM=TO]... [--kubeconfig PATH]";

fn main() {
    if let Err(e) = run() {
        eprintln!("k8s-apiserver: {e}\n{USAGE}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut scenario, mut listen, mut rewrites, mut kubeconfig) =
        (None, "127.0.0.1:6443".to_string(), Vec::new(), None);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--scenario" => scenario = Some(value()?),
            "--listen" => listen = value()?,
            "--rewrite" => {
                let v = value()?;
                let (from, to) = v.split_once('=').ok_or("--rewrite takes FROM=TO")?;
                rewrites.push((from.to_string(), to.to_string()));
            }
            "--kubeconfig" => kubeconfig = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mut s = match scenario.as_deref() {
        Some("cnpg-failover") => Scenario::cnpg_failover(),
        Some("patroni-switchover") => Scenario::patroni_switchover(),
        Some("patroni-bootstrap") => Scenario::patroni_bootstrap(),
        Some("cassandra-ring") => Scenario::cassandra_ring(),
        other => return Err(format!("unknown scenario {other:?}")),
    };
    for (from, to) in &rewrites {
        s = s.rewrite(from, to);
    }
    let addr: SocketAddr = listen.parse().map_err(|e| format!("--listen {listen}: {e}"))?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let server = runtime
        .block_on(FakeApiServer::start_on(addr, s))
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    if let Some(path) = &kubeconfig {
        std::fs::write(path, server.kubeconfig(ADMIN_TOKEN)).map_err(|e| format!("{path}: {e}"))?;
        println!("kubeconfig written to {path}");
    }
    println!("serving {} at resourceVersion {}", server.url(), server.rv());
    let _guard = runtime.enter();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["next"] => match server.next_rv() {
                Some(rv) => println!("applied {} step(s) up to {rv}", server.advance_to(rv)),
                None => println!("no steps left"),
            },
            ["advance", rv] => match rv.parse() {
                Ok(rv) => println!("applied {} step(s)", server.advance_to(rv)),
                Err(_) => println!("advance takes a resourceVersion"),
            },
            ["all"] => println!("applied {} step(s)", server.advance_all()),
            ["bookmark"] => server.bookmark(),
            ["expire"] => server.expire(),
            ["down"] => server.set_down(true),
            ["up"] => server.set_down(false),
            ["rv"] => println!(
                "resourceVersion {}, next step {:?}",
                server.rv(),
                server.next_rv()
            ),
            ["quit"] => break,
            [] => {}
            _ => println!("commands: next, advance RV, all, bookmark, expire, down, up, rv, quit"),
        }
    }
    Ok(())
}
