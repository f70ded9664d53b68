//! Kubernetes discovery against the fake API server replaying the recorded scenarios: the
//! member lists follow the recorded transitions, through relists, outages and RBAC errors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_apiserver::{FakeApiServer, Scenario, ADMIN_TOKEN};

use super::*;
use crate::common::metrics::Metrics;
use crate::discovery::{kubernetes_feed, Feed};

const P: Option<Role> = Some(Role::Primary);
const R: Option<Role> = Some(Role::Replica);

async fn client(fake: &FakeApiServer, token: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&fake.kubeconfig(token)).expect("kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .expect("config");
    kube::Client::try_from(config).expect("client")
}

fn k8s(services: &[&str], port: PortRef, roles: &str) -> KubernetesDiscovery {
    KubernetesDiscovery {
        namespace: "db".into(),
        services: services.iter().map(|s| s.to_string()).collect(),
        port,
        roles: RoleLabels::Preset(roles.into()),
        pod_selector: None,
    }
}

async fn feed(fake: &FakeApiServer, cfg: &KubernetesDiscovery) -> Feed {
    let metrics = Arc::new(Metrics::new());
    kubernetes_feed(cfg, client(fake, ADMIN_TOKEN).await, &metrics)
        .await
        .expect("discovery starts")
}

type Want<'a> = &'a [(&'a str, &'a str, Option<Role>)];

fn summary(members: &Option<Vec<Member>>) -> Vec<(String, String, Option<Role>)> {
    members
        .iter()
        .flatten()
        .map(|m| (m.id.clone(), m.address.clone(), m.labeled_role))
        .collect()
}

fn same(members: &Option<Vec<Member>>, want: Want<'_>) -> bool {
    let want: Vec<(String, String, Option<Role>)> = want
        .iter()
        .map(|(id, addr, role)| (id.to_string(), addr.to_string(), *role))
        .collect();
    members.is_some() && summary(members) == want
}

/// Waits (5 s at most) until the feed publishes exactly `want` (id, address, labeled role).
async fn expect(feed: &mut Feed, want: Want<'_>, at: &str) {
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(5), feed.members.wait_for(|m| same(m, want))).await,
        Ok(Ok(_))
    );
    if !ok {
        panic!(
            "{at}: members are {:?}, want {want:?}",
            summary(&feed.members.borrow())
        );
    }
}

/// Records every member list the feed publishes.
fn history(feed: &Feed) -> Arc<Mutex<Vec<Option<Vec<Member>>>>> {
    let seen: Arc<Mutex<Vec<Option<Vec<Member>>>>> = Arc::default();
    let mut rx = feed.members.clone();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            out.lock().unwrap().push(rx.borrow_and_update().clone());
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    seen
}

#[tokio::test]
async fn cloudnative_pg_failover_follows_the_recording() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let mut feed = feed(
        &fake,
        &k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg"),
    )
    .await;
    expect(
        &mut feed,
        &[
            ("pg-1", "10.244.1.11:5432", P),
            ("pg-2", "10.244.2.11:5432", R),
            ("pg-3", "10.244.3.11:5432", R),
        ],
        "initial list (RV 244)",
    )
    .await;
    let zones: Vec<_> = feed
        .members
        .borrow()
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| m.zone)
        .collect();
    assert_eq!(
        zones,
        [
            Some("zone-a".into()),
            Some("zone-b".into()),
            Some("zone-c".into())
        ]
    );
    let nodes: Vec<_> = feed
        .members
        .borrow()
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| m.node)
        .collect();
    assert_eq!(
        nodes,
        [
            Some("worker-1".into()),
            Some("worker-2".into()),
            Some("worker-3".into())
        ],
        "zone and node are reported separately"
    );
    fake.advance_to(247);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", R), ("pg-3", "10.244.3.11:5432", R)],
        "pg-1 not ready (247)",
    )
    .await;
    fake.advance_to(248);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", P), ("pg-3", "10.244.3.11:5432", R)],
        "pg-2 labelled primary (248)",
    )
    .await;
    fake.advance_to(258);
    expect(
        &mut feed,
        &[
            ("pg-1", "10.244.1.11:5432", R),
            ("pg-2", "10.244.2.11:5432", P),
            ("pg-3", "10.244.3.11:5432", R),
        ],
        "pg-1 back as a replica (258)",
    )
    .await;
    fake.advance_all();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(feed.status.failing().is_none(), "bookmarks are not errors");
}

#[tokio::test]
async fn patroni_switchover_follows_the_recording() {
    let fake = FakeApiServer::start(Scenario::patroni_switchover())
        .await
        .unwrap();
    let cfg = k8s(
        &["acid-pg", "acid-pg-repl"],
        PortRef::Name("postgresql".into()),
        "patroni",
    );
    let mut feed = feed(&fake, &cfg).await;
    let (p0, p1, p2) = ("10.244.1.21:5432", "10.244.2.21:5432", "10.244.3.21:5432");
    expect(
        &mut feed,
        &[("acid-pg-0", p0, P), ("acid-pg-1", p1, R), ("acid-pg-2", p2, R)],
        "RV 319",
    )
    .await;
    // The mirrored master slice carries no zone: the zone stays unknown (the node name is
    // not a zone), and the node is reported on its own.
    let first = feed.members.borrow().clone().unwrap()[0].clone();
    assert_eq!(first.zone, None);
    assert_eq!(first.node.as_deref(), Some("worker-1"));
    fake.advance_to(326);
    expect(
        &mut feed,
        &[("acid-pg-1", p1, R), ("acid-pg-2", p2, R)],
        "master slice deleted (326)",
    )
    .await;
    fake.advance_to(329);
    expect(
        &mut feed,
        &[("acid-pg-1", p1, P), ("acid-pg-2", p2, R)],
        "acid-pg-1 labelled master (329)",
    )
    .await;
    fake.advance_to(330);
    expect(
        &mut feed,
        &[("acid-pg-2", p2, R)],
        "repl slice drops acid-pg-1 (330)",
    )
    .await;
    fake.advance_to(332);
    expect(
        &mut feed,
        &[("acid-pg-1", p1, P), ("acid-pg-2", p2, R)],
        "new master slice (332)",
    )
    .await;
    fake.advance_to(334);
    expect(
        &mut feed,
        &[("acid-pg-1", p1, P), ("acid-pg-2", p2, R)],
        "acid-pg-0 not ready yet (334)",
    )
    .await;
    fake.advance_all();
    expect(
        &mut feed,
        &[("acid-pg-0", p0, R), ("acid-pg-1", p1, P), ("acid-pg-2", p2, R)],
        "acid-pg-0 replica",
    )
    .await;
}

#[tokio::test]
async fn patroni_bootstrap_from_an_empty_namespace() {
    let fake = FakeApiServer::start(Scenario::patroni_bootstrap()).await.unwrap();
    let cfg = k8s(
        &["acid-pg", "acid-pg-repl"],
        PortRef::Name("postgresql".into()),
        "patroni",
    );
    let mut feed = feed(&fake, &cfg).await;
    expect(&mut feed, &[], "empty namespace").await;
    // The placeholder slice (`endpoints: null`, `ports: null`) and unscheduled pods add nothing.
    fake.advance_to(319);
    expect(
        &mut feed,
        &[
            ("acid-pg-0", "10.244.1.21:5432", P),
            ("acid-pg-1", "10.244.2.21:5432", R),
            ("acid-pg-2", "10.244.3.21:5432", R),
        ],
        "bootstrapped (319)",
    )
    .await;
}

#[tokio::test]
async fn cassandra_pod_restart_keeps_its_identity_with_a_new_ip() {
    let fake = FakeApiServer::start(Scenario::cassandra_ring()).await.unwrap();
    let mut feed = feed(
        &fake,
        &k8s(&["cass"], PortRef::Name("cql".into()), "cloudnative-pg"),
    )
    .await;
    let (c0, c1, c2, c3) = (
        "10.244.1.31:9042",
        "10.244.2.31:9042",
        "10.244.3.31:9042",
        "10.244.1.32:9042",
    );
    expect(
        &mut feed,
        &[("cass-0", c0, None), ("cass-1", c1, None), ("cass-2", c2, None)],
        "RV 392",
    )
    .await;
    fake.advance_to(401);
    expect(
        &mut feed,
        &[("cass-0", c0, None), ("cass-1", c1, None), ("cass-2", c2, None)],
        "cass-3 not ready",
    )
    .await;
    fake.advance_to(403);
    let four = [
        ("cass-0", c0, None),
        ("cass-1", c1, None),
        ("cass-2", c2, None),
        ("cass-3", c3, None),
    ];
    expect(&mut feed, &four, "cass-3 ready (403)").await;
    // Deleting cass-1: terminating (still serving) is already out.
    fake.advance_to(408);
    expect(
        &mut feed,
        &[("cass-0", c0, None), ("cass-2", c2, None), ("cass-3", c3, None)],
        "cass-1 terminating",
    )
    .await;
    fake.advance_to(426);
    let new_ip = "10.244.2.32:9042";
    expect(
        &mut feed,
        &[
            ("cass-0", c0, None),
            ("cass-1", new_ip, None),
            ("cass-2", c2, None),
            ("cass-3", c3, None),
        ],
        "cass-1 back with a new IP (426)",
    )
    .await;
    fake.advance_all();
    expect(
        &mut feed,
        &[
            ("cass-0", c0, None),
            ("cass-1", new_ip, None),
            ("cass-2", c2, None),
        ],
        "scaled to 3",
    )
    .await;
    assert_eq!(
        feed.member_for_ip("10.244.2.32".parse().unwrap()).map(|m| m.id),
        Some("cass-1".into()),
        "a ring node's address maps to its pod"
    );
}

#[tokio::test]
async fn expired_watch_relists_without_dropping_the_members() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let mut feed = feed(
        &fake,
        &k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg"),
    )
    .await;
    let all = [
        ("pg-1", "10.244.1.11:5432", P),
        ("pg-2", "10.244.2.11:5432", R),
        ("pg-3", "10.244.3.11:5432", R),
    ];
    expect(&mut feed, &all, "initial").await;
    let seen = history(&feed);
    // The watcher lists 500 at a time; the health check LISTs 1.
    let lists = |fake: &FakeApiServer| {
        fake.requests()
            .iter()
            .filter(|r| r.is_list_of("endpointslices") && r.query.get("limit").is_some_and(|l| l == "500"))
            .count()
    };
    let before = lists(&fake);
    // While sluice is cut off, the failover starts and etcd compacts: the resumed watch
    // (from RV 244) gets `410 Expired` and the watcher lists again.
    fake.set_down(true);
    fake.advance_to(247);
    fake.expire();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_down(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lists(&fake) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relist after 410: {:?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", R), ("pg-3", "10.244.3.11:5432", R)],
        "after the relist",
    )
    .await;
    // The watch that follows the relist sees new events.
    fake.advance_to(248);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", P), ("pg-3", "10.244.3.11:5432", R)],
        "watching again",
    )
    .await;
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|m| m.as_ref().is_some_and(|m| m.len() >= 2)),
        "the member list never emptied during the relist: {seen:?}"
    );
    assert!(
        fake.requests().iter().any(|r| r.is_watch()
            && r.status == 200
            && r.query.get("resourceVersion").is_some_and(|v| v == "244")),
        "the first watch resumed from the list's resourceVersion"
    );
}

#[tokio::test]
async fn api_outage_keeps_the_members_and_reports_it() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let mut feed = feed(
        &fake,
        &k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg"),
    )
    .await;
    let all = [
        ("pg-1", "10.244.1.11:5432", P),
        ("pg-2", "10.244.2.11:5432", R),
        ("pg-3", "10.244.3.11:5432", R),
    ];
    expect(&mut feed, &all, "initial").await;
    fake.set_down(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while feed.status.failing().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outage is not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        same(&feed.members.borrow(), &all),
        "members kept during the outage"
    );
    // Back: the status clears and the watch resumes where it stopped.
    fake.set_down(false);
    while feed.status.failing().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(5),
            "recovery is not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.advance_to(247);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", R), ("pg-3", "10.244.3.11:5432", R)],
        "after the outage",
    )
    .await;
}

#[tokio::test]
async fn rbac_denial_and_bad_tokens_are_start_errors() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let cfg = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    let metrics = Arc::new(Metrics::new());
    fake.add_token(
        "no-rbac",
        "system:serviceaccount:db:no-rbac",
        Some("db"),
        Some(&[]),
    );
    let err = kubernetes_feed(&cfg, client(&fake, "no-rbac").await, &metrics)
        .await
        .err()
        .expect("forbidden");
    let text = err.to_string();
    assert!(matches!(err, StartError::Forbidden { .. }), "{text}");
    assert!(text.contains("cannot list resource \"endpointslices\""), "{text}");
    assert!(text.contains("get, list and watch"), "{text}");
    // Only slices granted: the pods are what is missing.
    let slices_only = [("endpointslices", "list"), ("endpointslices", "watch")];
    fake.add_token(
        "slices",
        "system:serviceaccount:db:half",
        Some("db"),
        Some(&slices_only),
    );
    let text = kubernetes_feed(&cfg, client(&fake, "slices").await, &metrics)
        .await
        .err()
        .expect("forbidden")
        .to_string();
    assert!(text.contains("cannot list resource \"pods\""), "{text}");
    let err = kubernetes_feed(&cfg, client(&fake, "wrong").await, &metrics)
        .await
        .err()
        .expect("unauthorized");
    assert!(
        matches!(err, StartError::Unauthorized { status: 401, .. }),
        "{err}"
    );
}

fn slice(json: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json).expect("slice")
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let ep = |ip: &str, pod: &str, ready: bool, serving: bool, terminating: bool| {
        serde_json::json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": pod},
        })
    };
    let mut slices = BTreeMap::new();
    slices.insert(
        "s".to_string(),
        slice(serde_json::json!({
            "metadata": {"name": "s"},
            "addressType": "IPv4",
            "endpoints": [ep("10.0.0.1", "a", false, true, true), ep("10.0.0.2", "b", true, true, false)],
            "ports": [{"name": "pg", "port": 5432}],
        })),
    );
    let pods = BTreeMap::new();
    let ids = |m: Vec<Member>| m.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(members(slices.values(), &pods, &PortRef::Name("pg".into()), &[])),
        ["b"]
    );
    slices.insert(
        "s".to_string(),
        slice(serde_json::json!({
            "metadata": {"name": "s"},
            "addressType": "IPv6",
            "endpoints": [ep("fd00::1", "a", false, true, true), ep("fd00::2", "b", false, false, true)],
            "ports": [{"name": "pg", "port": 5432}],
        })),
    );
    let m = members(slices.values(), &pods, &PortRef::Number(5432), &[]);
    assert_eq!(
        m.iter().map(|m| m.address.as_str()).collect::<Vec<_>>(),
        ["[fd00::1]:5432"]
    );
    // A named port the slice does not have: no members from it.
    assert!(members(slices.values(), &pods, &PortRef::Name("other".into()), &[]).is_empty());
}

#[test]
fn role_presets_and_custom_labels() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cnpg = role_rules(&RoleLabels::Preset("cloudnative-pg".into()));
    assert_eq!(
        labeled_role(&cnpg, &labels(&[("cnpg.io/instanceRole", "primary")])),
        P
    );
    assert_eq!(labeled_role(&cnpg, &labels(&[("role", "replica")])), R);
    let patroni = role_rules(&RoleLabels::Preset("patroni".into()));
    assert_eq!(labeled_role(&patroni, &labels(&[("spilo-role", "master")])), P);
    assert_eq!(labeled_role(&patroni, &labels(&[("spilo-role", "replica")])), R);
    let crunchy = role_rules(&RoleLabels::Preset("crunchy".into()));
    assert_eq!(
        labeled_role(
            &crunchy,
            &labels(&[("postgres-operator.crunchydata.com/role", "master")])
        ),
        P
    );
    let custom = role_rules(&RoleLabels::Custom {
        label: "db/role".into(),
        primary: "leader".into(),
        replica: "follower".into(),
    });
    assert_eq!(labeled_role(&custom, &labels(&[("db/role", "follower")])), R);
    assert_eq!(labeled_role(&custom, &labels(&[("db/role", "other")])), None);
    assert_eq!(
        slice_selector(&["a".into(), "b".into()]),
        "kubernetes.io/service-name in (a,b)"
    );
}

/// A client for a kubeconfig whose server is `url`.
async fn client_for(url: &str) -> kube::Client {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n\
         users:\n- name: u\n  user:\n    token: {ADMIN_TOKEN}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: db\n\
         current-context: c\n"
    );
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .expect("config");
    kube::Client::try_from(config).expect("client")
}

fn errors_counted(metrics: &Metrics) -> u64 {
    metrics
        .discovery_errors
        .get_or_create(&crate::common::metrics::DiscoveryLabels {
            cluster: "test".into(),
            source: "kubernetes",
        })
        .get()
}

/// Item 1 of issue 12: an API server that cannot be reached (a closed port) makes the source
/// fail once and stay failing, with retries that back off to tens of seconds instead of a
/// storm of "failing" / "reachable again" every 250 ms.
#[tokio::test(start_paused = true)]
async fn an_unreachable_api_server_is_retried_with_backoff_and_stays_failing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let metrics = Arc::new(Metrics::new());
    let cfg = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    let feed = kubernetes_feed(&cfg, client_for(&url).await, &metrics)
        .await
        .expect("an unreachable API server is not a start error");
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(600);
    while feed.status.failing().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failure is never reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Five minutes of (paused-clock) outage: failing all along, since the first failure.
    let mut longest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(300) {
        let (_, failing_for) = feed.status.failing().expect("the source never looks healthy");
        assert!(
            failing_for >= longest,
            "failing_seconds went back: {failing_for:?} < {longest:?}"
        );
        longest = failing_for;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(longest >= Duration::from_secs(290), "{longest:?}");
    assert!(!feed.status.is_synced());
    // Two watchers and the probe, each backing off to 30 s: a few dozen attempts in five
    // minutes, not the 1200 of a 250 ms retry loop.
    let errors = errors_counted(&metrics);
    assert!(
        (3..=60).contains(&errors),
        "{errors} failed attempts in 5 minutes"
    );
}

/// Item 2: an API server that keeps its connections but stops answering is reported within
/// 30 s (paused clock), the members stay, and the source recovers by itself.
#[tokio::test]
async fn a_hung_api_server_is_reported_within_30s_and_recovers() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let mut feed = feed(
        &fake,
        &k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg"),
    )
    .await;
    let all = [
        ("pg-1", "10.244.1.11:5432", P),
        ("pg-2", "10.244.2.11:5432", R),
        ("pg-3", "10.244.3.11:5432", R),
    ];
    expect(&mut feed, &all, "initial").await;
    // Nothing moves on a hung server, so the clock can be paused: the time it takes to notice
    // is the time sluice waits, not the test machine's speed.
    tokio::time::pause();
    fake.set_hung(true);
    let hung_at = tokio::time::Instant::now();
    while feed.status.failing().is_none() {
        assert!(
            hung_at.elapsed() <= Duration::from_secs(30),
            "the hang is not reported within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (error, _) = feed.status.failing().unwrap();
    assert!(error.contains("did not answer"), "{error}");
    assert!(same(&feed.members.borrow(), &all), "members kept while hung");
    tokio::time::resume();
    fake.set_hung(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while feed.status.failing().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery after the hang"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fake.advance_to(247);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", R), ("pg-3", "10.244.3.11:5432", R)],
        "watching again after the hang",
    )
    .await;
}

/// Item 3: a token that may list but not watch is refused at start, naming the verb.
#[tokio::test]
async fn a_forbidden_watch_is_a_start_error_naming_the_verb() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let cfg = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    let metrics = Arc::new(Metrics::new());
    fake.add_token(
        "list-only",
        "system:serviceaccount:db:list-only",
        Some("db"),
        Some(&[("endpointslices", "list"), ("pods", "list")]),
    );
    let err = kubernetes_feed(&cfg, client(&fake, "list-only").await, &metrics)
        .await
        .err()
        .expect("a watch that is forbidden is refused at start");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            StartError::Forbidden {
                verb: "watch",
                resource: "endpointslices",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("`watch` verb"), "{text}");
    assert!(
        text.contains("cannot watch resource \"endpointslices\""),
        "{text}"
    );
    // Slices complete, pods without watch: the pods are named.
    fake.add_token(
        "pods-no-watch",
        "system:serviceaccount:db:pods-no-watch",
        Some("db"),
        Some(&[
            ("endpointslices", "list"),
            ("endpointslices", "watch"),
            ("pods", "list"),
        ]),
    );
    let err = kubernetes_feed(&cfg, client(&fake, "pods-no-watch").await, &metrics)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            StartError::Forbidden {
                verb: "watch",
                resource: "pods",
                ..
            }
        ),
        "{err}"
    );
}

/// Item 3, at run time: when the watch becomes forbidden after start, the source reports it
/// and stays failing (no "reachable again" from a list that still works).
#[tokio::test]
async fn a_watch_forbidden_after_start_keeps_the_source_failing() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    fake.add_token("t", "system:serviceaccount:db:t", Some("db"), None);
    let cfg = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    let metrics = Arc::new(Metrics::new());
    let mut feed = kubernetes_feed(&cfg, client(&fake, "t").await, &metrics)
        .await
        .expect("starts");
    feed.synced(Duration::from_secs(5)).await.expect("synced");
    // RBAC changes: list stays, watch goes. Ending the watches makes kube watch again.
    fake.add_token(
        "t",
        "system:serviceaccount:db:t",
        Some("db"),
        Some(&[("endpointslices", "list"), ("pods", "list")]),
    );
    fake.end_watches();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while feed.status.failing().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forbidden watch is not reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It stays failing: sample for a few seconds of probes and retries.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let (error, _) = feed
            .status
            .failing()
            .expect("a forbidden watch never looks healthy");
        assert!(error.contains("watch") || error.contains("forbidden"), "{error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 4: a wrong Service name, namespace or port name is named, not silently empty.
#[tokio::test]
async fn configuration_mistakes_are_named() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let problems_of = |cfg: KubernetesDiscovery| {
        let fake = &fake;
        async move {
            let mut feed = feed(fake, &cfg).await;
            let members = feed.synced(Duration::from_secs(5)).await.expect("synced");
            assert!(members.is_empty(), "{members:?}");
            assert!(feed.status.failing().is_none(), "the API server answered");
            feed.status.problems()
        }
    };
    let problems = problems_of(k8s(
        &["pg-nope"],
        PortRef::Name("postgres".into()),
        "cloudnative-pg",
    ))
    .await;
    assert_eq!(
        problems,
        ["no EndpointSlice labelled kubernetes.io/service-name=pg-nope in namespace db"]
    );
    let mut other_ns = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    other_ns.namespace = "nope".into();
    assert_eq!(
        problems_of(other_ns).await,
        ["no EndpointSlice labelled kubernetes.io/service-name=pg-r in namespace nope"]
    );
    assert_eq!(
        problems_of(k8s(&["pg-r"], PortRef::Name("pg".into()), "cloudnative-pg")).await,
        ["slices of pg-r have ports [postgres], not pg"]
    );
    // A right configuration has none.
    let mut ok = feed(
        &fake,
        &k8s(
            &["pg-r", "pg-nope"],
            PortRef::Name("postgres".into()),
            "cloudnative-pg",
        ),
    )
    .await;
    assert_eq!(ok.synced(Duration::from_secs(5)).await.unwrap().len(), 3);
    assert_eq!(
        ok.status.problems(),
        ["no EndpointSlice labelled kubernetes.io/service-name=pg-nope in namespace db"],
        "one Service of two missing is named too"
    );
}

/// Item 5: `410 Expired` is routine (kube lists again), not a failure.
#[tokio::test]
async fn an_expired_watch_is_not_a_failure() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let cfg = k8s(&["pg-r"], PortRef::Name("postgres".into()), "cloudnative-pg");
    let mut feed = kubernetes_feed(&cfg, client(&fake, ADMIN_TOKEN).await, &metrics)
        .await
        .unwrap();
    feed.synced(Duration::from_secs(5)).await.expect("synced");
    fake.advance_to(247);
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", R), ("pg-3", "10.244.3.11:5432", R)],
        "247",
    )
    .await;
    let lists = |fake: &FakeApiServer| {
        fake.requests()
            .iter()
            .filter(|r| r.is_list_of("endpointslices") && r.query.get("limit").is_some_and(|l| l == "500"))
            .count()
    };
    let before = lists(&fake);
    // Compacted past the watch's resourceVersion: the resumed watch gets 410 and kube lists.
    fake.advance_to(248);
    fake.compact(fake.rv() + 1);
    fake.end_watches();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lists(&fake) <= before {
        assert!(tokio::time::Instant::now() < deadline, "no relist after 410");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect(
        &mut feed,
        &[("pg-2", "10.244.2.11:5432", P), ("pg-3", "10.244.3.11:5432", R)],
        "after the relist",
    )
    .await;
    assert!(feed.status.failing().is_none());
    assert_eq!(errors_counted(&metrics), 0, "410 Expired counted as a failure");
}
