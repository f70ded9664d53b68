//! What sluice says when Kubernetes discovery cannot work (issue 12): a wrong Service name,
//! namespace or port name is named in the log, `/topology`, `/readyz` and `sluice check
//! --online`; an API server that cannot be reached is reported once, not in a storm; kube's
//! routine disconnects are not WARN lines.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_apiserver::{FakeApiServer, Scenario, ADMIN_TOKEN};

use crate::support::{free_port, Sluice};
use crate::{blocking, pg_config};

/// A config for cluster `pg` whose discovery names `service`, `port` in `namespace`.
fn config(namespace: &str, service: &str, port: &str) -> String {
    pg_config(
        "",
        &format!(
            "[clusters.discovery.kubernetes]\nnamespace = \"{namespace}\"\nservice = \"{service}\"\nport = \"{port}\"\nroles = \"cloudnative-pg\""
        ),
    )
}

/// Runs `sluice check --online` on `toml` with `kubeconfig`: (success, stdout + stderr).
fn check_online(toml: &str, kubeconfig: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .args(["check", "--online"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run sluice check --online");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Polls `check` every 100 ms until it holds, or panics with `what()` after `wait`.
fn until(wait: Duration, mut check: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + wait;
    while !check() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_names_each_mistake() {
    // Pods at 127.0.0.21-23 on a port where nothing listens: nothing connects to 10.x.
    let closed = free_port();
    let scenario = Scenario::cnpg_failover()
        .rewrite("\"port\":5432", &format!("\"port\":{closed}"))
        .rewrite("\"10.244.1.11\"", "\"127.0.0.21\"")
        .rewrite("\"10.244.2.11\"", "\"127.0.0.22\"")
        .rewrite("\"10.244.3.11\"", "\"127.0.0.23\"");
    let fake = FakeApiServer::start(scenario).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig(ADMIN_TOKEN)).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_string();
    for (namespace, service, port, want) in [
        (
            "db",
            "pg-nope",
            "postgres",
            "no EndpointSlice labelled kubernetes.io/service-name=pg-nope in namespace db",
        ),
        (
            "nope",
            "pg-r",
            "postgres",
            "no EndpointSlice labelled kubernetes.io/service-name=pg-r in namespace nope",
        ),
        ("db", "pg-r", "pg", "slices of pg-r have ports [postgres], not pg"),
    ] {
        let toml = config(namespace, service, port);
        let (ok, text) = blocking(|| check_online(&toml, &kubeconfig));
        assert!(!ok, "{text}");
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // The right Service: every node is listed with its zone and node, and each one that does
    // not answer is named.
    let (ok, text) = blocking(|| check_online(&config("db", "pg-r", "postgres"), &kubeconfig));
    assert!(!ok, "{text}");
    assert!(text.contains("3 node(s)"), "{text}");
    for want in [
        "node pg-1 at 127.0.0.21",
        "zone zone-a, node worker-1",
        "zone zone-c, node worker-3",
        "cannot connect",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_service_is_named_in_the_log_topology_and_readyz() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig(ADMIN_TOKEN)).unwrap();
    let toml = config("db", "pg-nope", "postgres");
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let sluice = blocking(|| Sluice::spawn_with_env(&toml, &env));
    let want = "no EndpointSlice labelled kubernetes.io/service-name=pg-nope in namespace db";
    blocking(|| {
        until(
            Duration::from_secs(20),
            || {
                sluice
                    .logs()
                    .iter()
                    .any(|l| l.contains(" WARN ") && l.contains(want))
            },
            || format!("no WARN naming the Service:\n{}", sluice.logs().join("\n")),
        );
        let topology = || sluice.http_get("/topology").1;
        until(
            Duration::from_secs(20),
            || {
                let v: serde_json::Value = serde_json::from_str(&topology()).unwrap();
                v["clusters"][0]["discovery"]["problems"][0] == want
            },
            || format!("/topology does not name the Service: {}", topology()),
        );
        let readyz = || sluice.http_get("/readyz");
        until(
            Duration::from_secs(20),
            || {
                readyz()
                    == (
                        503,
                        format!("not ready: cluster \"pg\" has no healthy node: {want}\n"),
                    )
            },
            || format!("/readyz does not name the Service: {:?}", readyz()),
        );
    });
    sluice.assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_reported_once_and_failing_seconds_grow() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: u\n  user:\n    token: {ADMIN_TOKEN}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: db\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    let toml = config("db", "pg-r", "postgres");
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let sluice = blocking(|| Sluice::spawn_with_env(&toml, &env));
    let failing_seconds = || {
        let (status, topo) = http(&sluice, "/topology")?;
        (status == 200).then_some(())?;
        let v: serde_json::Value = serde_json::from_str(&topo).ok()?;
        v["clusters"][0]["discovery"]["failing_seconds"].as_u64()
    };
    blocking(|| {
        until(
            Duration::from_secs(40),
            || failing_seconds().is_some_and(|s| s >= 8),
            || {
                format!(
                    "failing_seconds does not grow to 8:\n{}",
                    sluice.logs().join("\n")
                )
            },
        )
    });
    let logs = sluice.logs();
    let discovery_lines: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("discovery source") && !l.contains(" DEBUG "))
        .collect();
    assert_eq!(
        discovery_lines.len(),
        1,
        "the outage is said once (then at most once a minute), not in a storm:\n{}",
        logs.join("\n")
    );
    assert!(discovery_lines[0].contains(" WARN "), "{}", discovery_lines[0]);
    assert!(
        !logs.iter().any(|l| l.contains("reachable again")),
        "{}",
        logs.join("\n")
    );
    assert!(
        !logs.iter().any(|l| l.contains(" WARN kube")),
        "kube's own WARN lines are not shown:\n{}",
        logs.join("\n")
    );
    sluice.assert_no_unexpected_errors(&[]);
}

/// `GET path` on sluice's admin listener; `None` while it does not answer yet.
fn http(sluice: &Sluice, path: &str) -> Option<(u16, String)> {
    crate::support::http_get(sluice.admin_addr(), path).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_server_is_reported_and_recovered_from() {
    // Pods at 127.0.0.24-26 on a closed port: the test is about discovery, not the nodes.
    let closed = free_port();
    let scenario = Scenario::cnpg_failover()
        .rewrite("\"port\":5432", &format!("\"port\":{closed}"))
        .rewrite("\"10.244.1.11\"", "\"127.0.0.24\"")
        .rewrite("\"10.244.2.11\"", "\"127.0.0.25\"")
        .rewrite("\"10.244.3.11\"", "\"127.0.0.26\"");
    let fake = FakeApiServer::start(scenario).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig(ADMIN_TOKEN)).unwrap();
    let toml = config("db", "pg-r", "postgres");
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let sluice = blocking(|| Sluice::spawn_with_env(&toml, &env));
    let up = "sluice_discovery_up{cluster=\"pg\",source=\"kubernetes\"}";
    let metric = |sluice: &Sluice| {
        let (_, body) = http(sluice, "/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(up).and_then(|v| v.trim().parse::<f64>().ok()))
    };
    blocking(|| {
        until(
            Duration::from_secs(20),
            || metric(&sluice) == Some(1.0),
            || format!("discovery never up:\n{}", sluice.logs().join("\n")),
        )
    });
    fake.set_hung(true);
    let hung_at = Instant::now();
    blocking(|| {
        // Issue 12 asks for 30 s; the deadline is generous for a busy machine.
        until(
            Duration::from_secs(45),
            || metric(&sluice) == Some(0.0),
            || format!("the hang is not reported:\n{}", sluice.logs().join("\n")),
        )
    });
    eprintln!("[test] hang reported after {:?}", hung_at.elapsed());
    let (_, topo) = sluice.http_get("/topology");
    assert!(topo.contains("may be hung"), "{topo}");
    assert!(topo.contains("127.0.0.24"), "the last nodes stay: {topo}");
    assert!(
        sluice
            .logs()
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("discovery source failing")),
        "{}",
        sluice.logs().join("\n")
    );
    fake.set_hung(false);
    blocking(|| {
        until(
            Duration::from_secs(45),
            || metric(&sluice) == Some(1.0),
            || format!("no recovery after the hang:\n{}", sluice.logs().join("\n")),
        )
    });
    assert!(sluice.logs().iter().any(|l| l.contains("reachable again")));
    sluice.assert_no_unexpected_errors(&[]);
}
