//! An API server outage keeps the last topology serving (and says so in /readyz and the
//! metrics); a compacted history (410 Expired) makes sluice list again; an RBAC denial stops
//! sluice at start with a message that says what to grant.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_apiserver::{FakeApiServer, Scenario};

use crate::support::{bounded, exec, PgCluster, Sluice};
use crate::{blocking, contract_config, read_port, write_port, K8sEnv};

/// Waits until `check` holds, polling every 100 ms, or panics with `what`.
async fn until(wait: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_serving_and_an_expired_watch_relists() {
    let cluster = blocking(|| PgCluster::start(2));
    let ports = cluster.node_ports();
    let ip = |n| Ipv4Addr::new(127, 0, 0, n);
    let pods = [
        ("10.244.1.11", ip(13), ports[0]),
        ("10.244.2.11", ip(14), ports[1]),
        ("10.244.3.11", ip(15), ports[2]),
    ];
    let mut env = K8sEnv::start(Scenario::cnpg_failover(), &pods, 5432, cluster).await;
    let (toml, _, _) = contract_config();
    env.start_sluice(&toml);
    let up = "sluice_discovery_up{cluster=\"pg\",source=\"kubernetes\"}";
    bounded(120, async {
        let client = env.client().await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        assert_eq!(env.sluice().metric(up), Some(1.0));

        // The API server goes away: the topology stays and keeps serving.
        env.fake.set_down(true);
        until(
            Duration::from_secs(15),
            "the outage never shows in /readyz",
            || {
                let (status, body) = env.sluice().http_get("/readyz");
                assert_eq!(
                    status, 200,
                    "an API outage must not take sluice out of its Service: {body}"
                );
                body.contains("degraded") && body.contains("kubernetes")
            },
        )
        .await;
        assert_eq!(env.sluice().metric(up), Some(0.0));
        let (_, topo) = env.sluice().http_get("/topology");
        assert!(topo.contains("\"healthy\":false"), "{topo}");
        assert_eq!(write_port(&client).await, ports[0]);
        let fresh = env.client().await;
        read_port(&fresh).await;

        // Meanwhile pg-1 leaves the Service and etcd compacts its history: when the API is
        // back, the resumed watch is too old (410) and sluice lists again.
        env.fake.advance_to(247);
        env.fake.expire();
        let lists = |env: &K8sEnv| {
            env.fake
                .requests()
                .iter()
                .filter(|r| {
                    r.is_list_of("endpointslices") && r.query.get("limit").is_some_and(|l| l == "500")
                })
                .count()
        };
        let before = lists(&env);
        env.fake.set_down(false);
        until(Duration::from_secs(20), "no relist after the 410", || {
            lists(&env) > before
        })
        .await;
        until(Duration::from_secs(10), "/readyz still degraded", || {
            !env.sluice().http_get("/readyz").1.contains("degraded")
        })
        .await;
        assert_eq!(env.sluice().metric(up), Some(1.0));
        let gone = env.pod_addr(ip(13));
        until(
            Duration::from_secs(5),
            "pg-1 still listed after the relist",
            || !env.sluice().http_get("/topology").1.contains(&gone),
        )
        .await;
        // pg-1 is no longer a member, so there is no primary: reads still work.
        read_port(&client).await;
        let errors = env
            .sluice()
            .metric("sluice_discovery_errors_total{cluster=\"pg\",source=\"kubernetes\"}");
        assert!(errors.unwrap_or(0.0) >= 1.0, "errors counted: {errors:?}");
    })
    .await;
    env.sluice().assert_no_unexpected_errors(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_denial_is_a_clear_startup_error() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    fake.add_token(
        "no-rbac",
        "system:serviceaccount:db:no-rbac",
        Some("db"),
        Some(&[]),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig("no-rbac")).unwrap();
    let (toml, _, _) = contract_config();
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    let sluice = blocking(|| Sluice::spawn_with_env(&toml, &env));
    let status = blocking(|| sluice.wait_exit(Duration::from_secs(30))).expect("sluice exits");
    assert!(!status.success(), "{status}");
    let logs = sluice.logs().join("\n");
    for want in [
        "RBAC denies sluice",
        "cannot list resource \"endpointslices\"",
        "get, list and watch",
        "system:serviceaccount:db:no-rbac",
    ] {
        assert!(logs.contains(want), "missing {want:?} in:\n{logs}");
    }
}
