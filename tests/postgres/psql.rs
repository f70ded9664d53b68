//! libpq clients: psql reads, writes and COPY through sluice.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::support::{bounded, pg_bin};
use crate::Env;

/// Runs psql through sluice as `app` with `args`, feeding `stdin`; blocking, so callers run
/// it on the blocking pool.
fn psql(port: u16, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(pg_bin("psql"))
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "app", "-d", "app", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .env("PGPASSWORD", "app-secret")
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().expect("psql output")
}

async fn psql_ok(port: u16, args: &[&str], stdin: &[u8]) -> String {
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.to_vec();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        psql(port, &args, &stdin)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psql {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reads_from_a_replica_and_writes_to_the_primary() {
    let env = Env::start(1, "");
    let port = env.sluice.listen_addr().port();
    bounded(60, async {
        let out = psql_ok(port, &["-Atc", "select pg_is_in_recovery()"], b"").await;
        assert_eq!(out, "t\n");

        psql_ok(
            port,
            &["-c", "create table p (x int)", "-c", "insert into p values (42)"],
            b"",
        )
        .await;
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let x: i32 = direct
            .query_one("SELECT x FROM p", &[])
            .await
            .expect("row written through psql")
            .get(0);
        assert_eq!(x, 42);
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_sluice() {
    let env = Env::start(1, "");
    let port = env.sluice.listen_addr().port();
    bounded(60, async {
        psql_ok(port, &["-c", "create table c (id int, v text)"], b"").await;
        let rows: String = (1..=1000).map(|i| format!("{i}\tvalue {i}\n")).collect();
        psql_ok(port, &["-c", "\\copy c from stdin"], rows.as_bytes()).await;
        let direct = env.cluster.superuser_client(env.cluster.primary_port()).await;
        let n: i64 = direct
            .query_one("SELECT count(*) FROM c", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1000, "rows copied in through sluice");

        env.cluster.wait_replicated().await;
        let out = psql_ok(port, &["-c", "copy (select * from c order by id) to stdout"], b"").await;
        assert_eq!(out, rows, "COPY TO STDOUT through sluice");
        let out = psql_ok(port, &["-Atc", "select count(*) from c"], b"").await;
        assert_eq!(out, "1000\n");
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
