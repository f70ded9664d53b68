//! The fake API server agrees with the recordings: for the recorded requests it sends the
//! recorded bytes (bodies, watch events, chunk boundaries, errors), and the state it reaches by
//! replaying a scenario's events is the state the real server listed afterwards.

use std::time::Duration;

use k8s_apiserver::{client, exchange, recording, FakeApiServer, Scenario, ADMIN_TOKEN};

const WAIT: Duration = Duration::from_secs(5);

/// The recorded request path (with query) and response chunks of an exchange.
fn recorded(scenario: &str, file: &str) -> (String, u16, Vec<Vec<u8>>) {
    let ex = exchange(scenario, file);
    let path = ex["request"]["path"].as_str().expect("path").to_string();
    let status = ex["response"]["status"].as_u64().expect("status") as u16;
    let body = recording(scenario, ex["response"]["body_file"].as_str().expect("body_file"));
    let chunks = match ex["response"]["chunks"].as_array() {
        Some(chunks) => chunks
            .iter()
            .map(|c| {
                let off = c["offset"].as_u64().unwrap() as usize;
                let len = c["len"].as_u64().unwrap() as usize;
                body[off..off + len].to_vec()
            })
            .collect(),
        None => vec![body],
    };
    (path, status, chunks)
}

/// Compares two texts, showing where they first differ instead of both in full.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show =
        |b: &[u8]| String::from_utf8_lossy(&b[at.saturating_sub(120)..(at + 120).min(b.len())]).into_owned();
    panic!(
        "{what}: {} bytes, want {}; first difference at byte {at}:\n got: …{}…\nwant: …{}…",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

async fn get(fake: &FakeApiServer, path: &str) -> client::RawResponse {
    client::get(fake.addr(), path, Some(ADMIN_TOKEN))
        .await
        .expect("GET")
}

/// A LIST answered by the fake has the recorded status, bytes and chunk boundaries.
async fn assert_list_matches(fake: &FakeApiServer, scenario: &str, file: &str) {
    let (path, status, want) = recorded(scenario, file);
    let mut r = get(fake, &path).await;
    assert_eq!(r.status, status, "{scenario}/{file}");
    let got = r.all_chunks(WAIT).await.expect("body");
    assert_same(&got.concat(), &want.concat(), &format!("{scenario}/{file}: body"));
    let sizes = |c: &[Vec<u8>]| c.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(sizes(&got), sizes(&want), "{scenario}/{file}: chunk boundaries");
    assert_eq!(
        r.header("transfer-encoding").is_some(),
        want.len() > 1 || exchange(scenario, file)["response"]["transfer_encoding"].is_string(),
        "{scenario}/{file}: chunked or Content-Length"
    );
}

/// Replays a recorded watch one event at a time; every event arrives in its own chunk with
/// the recorded bytes, as a live watch's events do.
async fn assert_watch_replays(fake: &FakeApiServer, scenario: &str, file: &str) {
    let (path, _, want) = recorded(scenario, file);
    let want = want.concat();
    let want_lines: Vec<&[u8]> = want.split_inclusive(|b| *b == b'\n').collect();
    let mut r = get(fake, &path).await;
    assert_eq!(r.status, 200);
    let mut got = Vec::new();
    while got.len() < want_lines.len() {
        let Some(rv) = fake.next_rv() else { break };
        fake.advance_to(rv);
        // Steps of the other resource produce nothing on this watch.
        while let Ok(Some(chunk)) = r.next_chunk(Duration::from_millis(150)).await {
            assert!(chunk.ends_with(b"\n"), "{file}: one whole event per chunk");
            got.extend(chunk.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec));
        }
    }
    fake.end_watches();
    assert_eq!(
        r.next_chunk(WAIT).await,
        Ok(None),
        "{file}: the watch ends with the terminating chunk"
    );
    assert_same(&got.concat(), &want, &format!("{scenario}/{file}"));
}

#[tokio::test]
async fn cnpg_lists_watches_and_pages_match_the_recordings() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    assert_list_matches(&fake, "cnpg-failover", "01-list-endpointslices.exchange.json").await;
    assert_list_matches(&fake, "cnpg-failover", "02-list-pods.exchange.json").await;
    assert_watch_replays(&fake, "cnpg-failover", "04-watch-pods.exchange.json").await;
    // The same failover replayed in one go to a watch of the slices.
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let (slices, _, _) = recorded("cnpg-failover", "03-watch-endpointslices.exchange.json");
    let mut slice_watch = get(&fake, &slices).await;
    fake.advance_all();
    let (_, _, want) = recorded("cnpg-failover", "03-watch-endpointslices.exchange.json");
    fake.end_watches();
    let got = slice_watch.all_chunks(WAIT).await.expect("slice watch");
    assert_same(&got.concat(), &want.concat(), "body");
    // After the failover, the paginated LIST (limit=2 + continue token) is what the real
    // server listed, continue token included.
    assert_list_matches(&fake, "cnpg-failover", "07-list-pods-page1.exchange.json").await;
    assert_list_matches(&fake, "cnpg-failover", "08-list-pods-page2.exchange.json").await;
}

#[tokio::test]
async fn cnpg_streaming_list_matches_the_recording() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let (path, _, want) = recorded("cnpg-failover", "05-streaming-watch-endpointslices.exchange.json");
    let mut r = get(&fake, &path).await;
    // The initial ADDED events (by name, each with its own RV) and the initial-events-end
    // BOOKMARK come through the 2048-byte buffer: 2048, 2048, 1527.
    let mut initial = Vec::new();
    while let Ok(Some(c)) = r.next_chunk(Duration::from_millis(300)).await {
        initial.push(c);
    }
    assert_eq!(
        initial.iter().map(Vec::len).collect::<Vec<_>>(),
        want[..3].iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_same(&initial.concat(), &want[..3].concat(), "initial events");
    fake.advance_all();
    fake.end_watches();
    let rest = r.all_chunks(WAIT).await.unwrap();
    assert_same(&rest.concat(), &want[3..].concat(), "body");
}

#[tokio::test]
async fn patroni_bootstrap_replays_into_the_listed_state() {
    let fake = FakeApiServer::start(Scenario::patroni_bootstrap()).await.unwrap();
    assert_list_matches(
        &fake,
        "patroni-switchover",
        "01-list-endpointslices-empty.exchange.json",
    )
    .await;
    assert_list_matches(&fake, "patroni-switchover", "02-list-pods-empty.exchange.json").await;
    // The bootstrap watch, replayed event by event; the recorded LIST at RV 319 is the state
    // in the middle of it.
    let (path, _, _) = recorded(
        "patroni-switchover",
        "03-watch-endpointslices-from-bootstrap.exchange.json",
    );
    let mut slice_watch = get(&fake, &path).await;
    fake.advance_to(319);
    assert_list_matches(
        &fake,
        "patroni-switchover",
        "05-list-endpointslices.exchange.json",
    )
    .await;
    assert_list_matches(&fake, "patroni-switchover", "06-list-pods.exchange.json").await;
    // Those LISTs were made at RV 357 (later writes went to other objects).
    fake.advance_to(357);
    assert_list_matches(
        &fake,
        "patroni-switchover",
        "09-list-endpointslices-after.exchange.json",
    )
    .await;
    assert_list_matches(&fake, "patroni-switchover", "10-list-pods-after.exchange.json").await;
    fake.end_watches();
    let (_, _, want) = recorded(
        "patroni-switchover",
        "03-watch-endpointslices-from-bootstrap.exchange.json",
    );
    let got = slice_watch.all_chunks(WAIT).await.unwrap();
    assert_same(&got.concat(), &want.concat(), "body");
}

#[tokio::test]
async fn patroni_switchover_watch_replays_event_by_event() {
    let fake = FakeApiServer::start(Scenario::patroni_switchover())
        .await
        .unwrap();
    assert_watch_replays(
        &fake,
        "patroni-switchover",
        "07-watch-endpointslices.exchange.json",
    )
    .await;
    let fake = FakeApiServer::start(Scenario::patroni_switchover())
        .await
        .unwrap();
    assert_watch_replays(&fake, "patroni-switchover", "08-watch-pods.exchange.json").await;
}

#[tokio::test]
async fn cassandra_ring_replays_into_the_listed_state() {
    let fake = FakeApiServer::start(Scenario::cassandra_ring()).await.unwrap();
    assert_list_matches(&fake, "cassandra-ring", "01-list-endpointslices.exchange.json").await;
    assert_list_matches(&fake, "cassandra-ring", "02-list-pods.exchange.json").await;
    assert_watch_replays(&fake, "cassandra-ring", "03-watch-endpointslices.exchange.json").await;
    fake.advance_to(455);
    assert_list_matches(
        &fake,
        "cassandra-ring",
        "05-list-endpointslices-after.exchange.json",
    )
    .await;
    assert_list_matches(&fake, "cassandra-ring", "06-list-pods-after.exchange.json").await;
}

#[tokio::test]
async fn errors_match_the_recordings() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    // 410 inside a 200 watch, after compaction: one ERROR event, then the end.
    fake.compact(465);
    let (path, status, want) = recorded("errors", "01-watch-too-old-resourceversion.exchange.json");
    let mut r = get(&fake, &path).await;
    assert_eq!(r.status, status);
    assert_eq!(r.all_chunks(WAIT).await.unwrap(), want);
    // RBAC: a ServiceAccount without grants, then anonymous, then an unknown token.
    fake.add_token(
        "no-rbac",
        "system:serviceaccount:db:no-rbac",
        Some("db"),
        Some(&[]),
    );
    for (file, token) in [
        (
            "09-list-endpointslices-forbidden-serviceaccount.exchange.json",
            Some("no-rbac"),
        ),
        (
            "10-watch-pods-forbidden-serviceaccount.exchange.json",
            Some("no-rbac"),
        ),
        ("08-list-anonymous.exchange.json", None),
        ("07-list-invalid-token.exchange.json", Some("not-a-token")),
    ] {
        let (path, status, want) = recorded("errors", file);
        let mut r = client::get(fake.addr(), &path, token).await.unwrap();
        assert_eq!(r.status, status, "{file}");
        assert!(
            r.header("content-length").is_some(),
            "{file}: errors are not chunked"
        );
        assert_same(&r.all_chunks(WAIT).await.unwrap().concat(), &want.concat(), file);
    }
    // 404s, 400 and the empty list of a missing namespace.
    for file in [
        "14-get-endpointslice-missing-namespace.exchange.json",
        "15-get-pod-missing.exchange.json",
        "18-list-unserved-version.exchange.json",
        "19-list-invalid-label-selector.exchange.json",
    ] {
        let (path, status, want) = recorded("errors", file);
        let mut r = get(&fake, &path).await;
        assert_eq!(r.status, status, "{file}");
        assert_same(&r.all_chunks(WAIT).await.unwrap().concat(), &want.concat(), file);
    }
    let (path, _, _) = recorded("errors", "16-list-endpointslices-missing-namespace.exchange.json");
    let mut r = get(&fake, &path).await;
    assert_eq!(r.status, 200);
    let body = String::from_utf8(r.all_chunks(WAIT).await.unwrap().concat()).unwrap();
    assert!(body.ends_with("\"items\":[]}\n"), "{body}");
}

#[tokio::test]
async fn rbac_grants_follow_the_minimal_role() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let rules = [
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "watch"),
        ("endpointslices", "get"),
        ("endpointslices", "list"),
        ("endpointslices", "watch"),
    ];
    fake.add_token(
        "proxy",
        "system:serviceaccount:db:db-proxy",
        Some("db"),
        Some(&rules),
    );
    for (file, status) in [
        (
            "06-list-endpointslices-other-namespace-forbidden.exchange.json",
            403,
        ),
        (
            "07-list-endpointslices-all-namespaces-forbidden.exchange.json",
            403,
        ),
    ] {
        let (path, want_status, want) = recorded("rbac", file);
        assert_eq!(want_status, status);
        let mut r = client::get(fake.addr(), &path, Some("proxy")).await.unwrap();
        assert_eq!(r.status, status, "{file}");
        assert_same(&r.all_chunks(WAIT).await.unwrap().concat(), &want.concat(), file);
    }
    let r = client::get(
        fake.addr(),
        "/apis/discovery.k8s.io/v1/namespaces/db/endpointslices?&limit=500",
        Some("proxy"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_hung_server_keeps_connections_and_answers_nothing_until_resumed() {
    let fake = FakeApiServer::start(Scenario::cnpg_failover()).await.unwrap();
    let watch_path = "/apis/discovery.k8s.io/v1/namespaces/db/endpointslices?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=244";
    let mut watch = get(&fake, watch_path).await;
    assert_eq!(watch.status, 200);
    fake.set_hung(true);
    fake.advance_to(247);
    // The open watch sends nothing, and a new request is connected but not answered.
    assert!(watch.next_chunk(Duration::from_millis(300)).await.is_err());
    let addr = fake.addr();
    let list = tokio::spawn(async move {
        client::get(addr, "/api/v1/namespaces/db/pods?&limit=500", Some(ADMIN_TOKEN)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!list.is_finished(), "a hung server answered");
    // Resumed: the waiting request is answered and the watch delivers what happened meanwhile.
    fake.set_hung(false);
    let r = tokio::time::timeout(Duration::from_secs(5), list)
        .await
        .expect("answered once resumed")
        .unwrap()
        .expect("GET");
    assert_eq!(r.status, 200);
    let chunk = watch
        .next_chunk(Duration::from_secs(5))
        .await
        .expect("the watch resumes")
        .expect("a chunk");
    assert!(String::from_utf8_lossy(&chunk).contains("\"type\":\"MODIFIED\""));
}
