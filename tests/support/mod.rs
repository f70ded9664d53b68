//! Integration-test harness: real PostgreSQL clusters and the real `sluice` binary.
//!
//! Every test binary includes this module; not every binary uses every helper.
#![allow(dead_code, unused_imports)]

pub mod certs;
mod http;
mod pg;
mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use http::http_get;
pub use pg::{free_port, pg_bin, PgCluster};
pub use proxy::{sluice_config, Sluice};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Runs a test body with a deadline, so a hung proxy fails the test instead of the CI job.
pub async fn bounded<F: Future>(secs: u64, body: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {secs} s"),
    }
}

/// Connects with tokio-postgres (no TLS) and drives the connection on a spawned task.
pub async fn try_connect(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    try_connect_with_handle(addr, user, password, db)
        .await
        .map(|(client, _)| client)
}

/// Like [`try_connect`], also returning the connection task so a test can abort it (which
/// closes the socket without a Terminate message, like a crashed client).
pub async fn try_connect_with_handle(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = cfg.connect(NoTls).await?;
    let label = format!("{user}@{addr}");
    let handle = tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("[client {label}] connection ended with error: {e}");
        }
    });
    Ok((client, handle))
}

/// Runs `sql` with psql (libpq) as `user` against 127.0.0.1:`port`, unaligned and tuples only.
pub fn psql_as(port: u16, user: &str, password: &str, db: &str, sql: &str) -> std::process::Output {
    std::process::Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ])
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .output()
        .expect("psql")
}

/// Connects or panics with the error (including its SQLSTATE, if any).
pub async fn connect(addr: SocketAddr, user: &str, password: &str, db: &str) -> Client {
    match try_connect(addr, user, password, db).await {
        Ok(client) => client,
        Err(e) => panic!("connecting to {addr} as {user}/{db} failed: {}", describe(&e)),
    }
}

/// Formats a tokio-postgres error with its server-side details, which `Display` leaves out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => format!("{e:?}"),
    }
}

/// Runs a query in the simple protocol and returns the first column of each row as text.
pub async fn simple_column(client: &Client, sql: &str) -> Vec<String> {
    simple_rows(client, sql)
        .await
        .into_iter()
        .map(|mut row| row.remove(0))
        .collect()
}

/// Runs a query in the simple protocol and returns every row as text (NULL as "NULL").
pub async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    let messages = match client.simple_query(sql).await {
        Ok(m) => m,
        Err(e) => panic!("{sql:?} failed: {}", describe(&e)),
    };
    messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs a statement in the simple protocol, panicking with the server's message on error.
pub async fn exec(client: &Client, sql: &str) {
    if let Err(e) = client.batch_execute(sql).await {
        panic!("{sql:?} failed: {}", describe(&e));
    }
}

/// The series names a `/metrics` body can have: what its `# TYPE` lines declare (a counter `x`
/// has samples `x_total`; a histogram `_bucket`, `_sum` and `_count`), and every sample's name.
pub fn exported_series(metrics: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in metrics.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Waits (up to 10 s) until `sluice`'s `/metrics` has every series in `used` (what `dashboard`
/// queries), and fails naming the missing ones.
pub async fn wait_until_exported(
    sluice: &Sluice,
    used: &std::collections::BTreeSet<String>,
    dashboard: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, metrics) = sluice.http_get("/metrics");
        assert_eq!(status, 200);
        let exported = exported_series(&metrics);
        let missing: Vec<_> = used.iter().filter(|m| !exported.contains(*m)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {dashboard} queries metrics /metrics does not have: {missing:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
