//! Runs a CQL test cluster until interrupted:
//! `sluice-cql-testcluster [--nodes N] [--port P] [--num-tokens K] [--credentials user:pass]
//! [--tls CERT.pem KEY.pem]`.

use std::process::ExitCode;

use sluice_cql_testcluster::{ClusterSpec, TestCluster};

fn main() -> ExitCode {
    let mut nodes = 3usize;
    let mut port = 9042u16;
    let mut num_tokens = 16usize;
    let mut credentials = None;
    let mut tls = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            "--nodes" => nodes = value("--nodes").parse().expect("--nodes N"),
            "--port" => port = value("--port").parse().expect("--port P"),
            "--num-tokens" => num_tokens = value("--num-tokens").parse().expect("--num-tokens K"),
            "--credentials" => credentials = Some(value("--credentials")),
            "--tls" => tls = Some((value("--tls CERT"), value("--tls KEY"))),
            "-h" | "--help" => {
                println!("usage: sluice-cql-testcluster [--nodes N] [--port P] [--num-tokens K] [--credentials user:pass] [--tls CERT.pem KEY.pem]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let mut spec = ClusterSpec::new(nodes, num_tokens);
    spec.port = port;
    if let Some(c) = credentials {
        let (u, p) = c.split_once(':').expect("--credentials user:pass");
        spec = spec.with_credentials(u, p);
    }
    if let Some((cert, key)) = tls {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        spec = spec.with_tls(&read(&cert), &read(&key));
    }
    let cluster = match TestCluster::start(spec) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    for a in cluster.contact_points() {
        println!("node listening on {a}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    let records = cluster.records();
    let routed: Vec<_> = records
        .iter()
        .filter_map(|r| r.coordinator_is_replica())
        .collect();
    let hits = routed.iter().filter(|x| **x).count();
    println!(
        "{} requests, {} with a partition key, {} coordinated by a replica",
        records.len(),
        routed.len(),
        hits
    );
    ExitCode::SUCCESS
}
