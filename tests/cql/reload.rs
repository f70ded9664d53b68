//! Reloading CQL clusters: a changed cluster takes new clients while the connections open on
//! the old one keep working, a cluster added by a reload listens, a removed one stops.

use std::time::{Duration, Instant};

use sluice_cql::Compression;

use crate::client::Client;
use crate::support::{bounded, free_port};
use crate::Env;

/// Rewrites sluice's configuration, sends SIGHUP and waits until the reload counted `n` ok.
async fn reload(env: &Env, text: &str, n: f64) {
    std::fs::write(env.sluice.config_path(), text).expect("write the configuration");
    env.sluice.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    let series = "sluice_config_reloads_total{result=\"ok\"}";
    while env.sluice.metric(series) != Some(n) {
        let failed = env.sluice.metric("sluice_config_reloads_total{result=\"error\"}");
        assert!(
            failed.unwrap_or(0.0) == 0.0,
            "reload failed:\n{}",
            env.sluice.logs().join("\n")
        );
        assert!(Instant::now() < deadline, "reload {n} not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_clusters_are_changed_added_and_removed_by_a_reload() {
    let env = Env::start(3, "", "");
    bounded(90, async {
        let original = std::fs::read_to_string(env.sluice.config_path()).unwrap();
        let mut before = Client::connect(env.addr(), 4, Compression::None).await;
        before.ok("SELECT release_version FROM system.local").await;

        // Changed: new clients get the new settings; the open connection carries on.
        let changed = format!("{original}\n[clusters.cql]\nrequest_timeout = \"7s\"\n");
        reload(&env, &changed, 1.0).await;
        let mut after = Client::connect(env.addr(), 4, Compression::None).await;
        after.ok("SELECT release_version FROM system.local").await;
        before.ok("SELECT release_version FROM system.local").await;

        // Added: a second cluster on a new address.
        let port = free_port();
        let seeds = env.cluster.contact_points_toml();
        let second = format!(
            "{changed}\n[[clusters]]\nname = \"ring2\"\nprotocol = \"cql\"\nlisten = \"127.0.0.1:{port}\"\n\n[clusters.discovery]\nstatic = {seeds}\n"
        );
        reload(&env, &second, 2.0).await;
        let addr2: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut other = Client::connect(addr2, 5, Compression::None).await;
        other.ok("SELECT release_version FROM system.local").await;

        // Removed: its address no longer takes connections.
        reload(&env, &changed, 3.0).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr2).await.is_ok() {
            assert!(Instant::now() < deadline, "ring2 still listens after its removal");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        after.ok("SELECT release_version FROM system.local").await;
    })
    .await;
    env.sluice.assert_no_unexpected_errors(&[]);
}
