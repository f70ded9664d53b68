//! The admin listener's status page (`/`) as a real headless Chromium renders it, and the
//! Grafana dashboard in `deploy/grafana/` against the real `/metrics`.
//!
//! `SLUICE_STATUS_SCREENSHOT=docs/status-page.png` (any path) also saves a
//! screenshot of the page while both nodes are up (how the README's image is made).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{bounded, exec, simple_column};
use crate::Env;

/// The Chromium binary (Debian's `chromium` package), or a failure that says what to install.
fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the status page test needs Chromium: install Debian's `chromium` package \
             (apt-get install -y chromium); .ci/run does this"
        )
    })
}

/// Runs headless Chromium with `args` and `url` (30 s at most); returns its stdout.
fn run_chromium(chromium: &Path, args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("temporary Chromium profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
    // Read both pipes on threads so that a chatty Chromium cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for Chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "Chromium did not finish within 30 s: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    assert!(
        status.success(),
        "Chromium failed ({status}): {}",
        err.join().unwrap_or_default()
    );
    stdout
}

/// The DOM Chromium builds from the page, scripts and all (`--dump-dom`).
async fn dom(chromium: &Path, url: &str) -> String {
    let (chromium, url) = (chromium.to_path_buf(), url.to_string());
    tokio::task::spawn_blocking(move || run_chromium(&chromium, &["--dump-dom"], &url))
        .await
        .expect("Chromium thread")
}

/// The (role, health) the rendered page gives the node with this id.
fn node_state(dom: &str, id: &str) -> Option<(String, String)> {
    let re = Regex::new(&format!(
        r#"<tr class="node" data-node="{}" data-role="([a-z-]+)" data-health="(up|down)">"#,
        regex::escape(id)
    ))
    .expect("regex");
    re.captures(dom).map(|c| (c[1].to_string(), c[2].to_string()))
}

/// Loads the page in Chromium until `done` holds for its DOM (`within` at most).
async fn wait_for_page(
    chromium: &Path,
    url: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let dom = dom(chromium, url).await;
        if done(&dom) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "the status page did not show {what} within {within:?}:\n{dom}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_nodes_and_a_node_going_down() {
    let chromium = chromium();
    let env = Env::start(1, "");
    let primary = format!("127.0.0.1:{}", env.cluster.primary_port());
    let replica_port = env.cluster.replica_ports()[0];
    let replica = format!("127.0.0.1:{replica_port}");
    let url = format!("http://{}/", env.sluice.admin_addr());
    bounded(180, async {
        // A client and a pooled connection, so that the page has a pool row.
        let client = env.app_client().await;
        assert_eq!(simple_column(&client, "SELECT 1").await, ["1"]);

        let up = |id: &str, role: &str, dom: &str| {
            node_state(dom, id) == Some((role.to_string(), "up".to_string()))
        };
        let page = wait_for_page(&chromium, &url, Duration::from_secs(20), "both nodes up", |dom| {
            up(&primary, "primary", dom) && up(&replica, "replica", dom)
        })
        .await;
        assert!(page.contains("<title>sluice status</title>"), "{page}");
        assert!(
            page.contains(r#"<section class="cluster" data-cluster="app">"#),
            "{page}"
        );
        assert!(
            page.contains(r#"<tr class="pool" data-database="app" data-user="app">"#),
            "no pool row for app/app:\n{page}"
        );
        assert!(page.contains(r#"<meta http-equiv="refresh" content="2">"#));
        // The replica's lag in WAL bytes and in seconds.
        let row = |page: &str, id: &str| {
            page.lines()
                .find(|l| l.contains(&format!(r#"data-node="{id}""#)))
                .unwrap_or_else(|| panic!("no row for {id}:\n{page}"))
                .to_string()
        };
        let replica_row = row(&page, &replica);
        assert!(
            Regex::new(r#"<td class="num" title="\d+ bytes of WAL">[0-9.]+ [KMGT]?i?B</td><td class="num">\d+\.\d s</td>"#)
                .unwrap()
                .is_match(&replica_row),
            "no lag in bytes and seconds: {replica_row}"
        );

        if let Some(path) = std::env::var_os("SLUICE_STATUS_SCREENSHOT") {
            let path = std::path::absolute(PathBuf::from(path)).expect("screenshot path");
            let (c, u) = (chromium.clone(), url.clone());
            let arg = format!("--screenshot={}", path.display());
            tokio::task::spawn_blocking(move || {
                run_chromium(&c, &[&arg, "--window-size=1200,430", "--hide-scrollbars"], &u)
            })
            .await
            .expect("Chromium thread");
            eprintln!("screenshot saved to {}", path.display());
        }

        env.cluster.stop_node(replica_port);
        let page = wait_for_page(
            &chromium,
            &url,
            Duration::from_secs(20),
            "the replica down",
            |dom| node_state(dom, &replica).is_some_and(|(_, health)| health == "down"),
        )
        .await;
        assert!(up(&primary, "primary", &page), "{page}");
        // The probe's error is shown, escaped, in the replica's row.
        let row = row(&page, &replica);
        assert!(
            Regex::new(r#"<td class="error">[^<]+</td>"#)
                .unwrap()
                .is_match(&row),
            "no error in the replica's row: {row}"
        );
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[&replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/sluice-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");

    // Every query: panel targets (rows included) and template variables.
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "panel without a query: {}", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("target expr").to_string());
        }
    }
    let variables = dashboard["templating"]["list"].as_array().expect("templating");
    let cluster = variables
        .iter()
        .find(|v| v["name"] == "cluster")
        .expect("a `cluster` template variable");
    exprs.push(
        cluster["query"]["query"]
            .as_str()
            .expect("cluster query")
            .to_string(),
    );

    let metric = Regex::new(r"\bsluice_[a-zA-Z0-9_:]+").unwrap();
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric.find_iter(e).map(|m| m.as_str().to_string()))
        .collect();
    assert!(used.len() >= 15, "the dashboard queries few metrics: {used:?}");
    // Every per-cluster query follows the variable.
    for e in &exprs {
        if !e.contains("sluice_config_reloads") && !e.starts_with("label_values") {
            assert!(e.contains("$cluster"), "query ignores $cluster: {e}");
        }
    }

    let env = Env::start(1, "");
    bounded(30, async {
        // Traffic, so that the families labelled by what happened have a series: a read and a
        // write (routes), LISTEN (a pin), a Terminate before the startup packet (an error).
        let client = env.app_client().await;
        assert_eq!(simple_column(&client, "SELECT 1").await, ["1"]);
        exec(&client, "LISTEN status_page").await;
        let mut raw = tokio::net::TcpStream::connect(env.sluice.listen_addr())
            .await
            .expect("connect");
        raw.write_all(&[b'X', 0, 0, 0, 4]).await.expect("Terminate");
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.expect("sluice closes");

        crate::support::wait_until_exported(&env.sluice, &used, "dashboard").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
