//! DNS discovery (a headless Service's SRV records, outside Kubernetes too): sluice asks a
//! tiny DNS server on 127.0.0.1 and follows its answers as their TTL runs out.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_apiserver::dns::FakeDns;

use crate::support::{bounded, exec, PgCluster, Sluice};
use crate::{blocking, read_port, wait_for_node, write_port};

const SRV: &str = "_postgres._tcp.pg.db.svc.cluster.local.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_find_the_nodes_and_follow_changes() {
    let cluster = blocking(|| PgCluster::start(1));
    let ports = cluster.node_ports();
    let dns = FakeDns::start().await.unwrap();
    let (pg0, pg1) = ("pg-0.pg.db.svc.cluster.local.", "pg-1.pg.db.svc.cluster.local.");
    dns.set_srv(SRV, &[(pg0, ports[0]), (pg1, ports[1])], 1);
    dns.set_a(pg0, &[Ipv4Addr::LOCALHOST], 1);
    dns.set_a(pg1, &[Ipv4Addr::LOCALHOST], 1);
    let toml = crate::pg_config(
        "",
        &format!(
            "[clusters.discovery]\ndns = {{ srv = \"{SRV}\", nameservers = [\"{}\"], min_refresh = \"200ms\" }}",
            dns.addr()
        ),
    );
    let sluice = blocking(|| Sluice::start(&toml));
    bounded(60, async {
        let client = crate::support::connect(sluice.listen_addr(), "app", "app-secret", "app").await;
        exec(&client, "CREATE TABLE k (id serial)").await;
        assert_eq!(write_port(&client).await, ports[0]);
        cluster.wait_replicated().await;
        assert_eq!(read_port(&client).await, ports[1]);
        let node = wait_for_node(
            &sluice,
            &format!("127.0.0.1:{}", ports[1]),
            "replica",
            Duration::from_secs(5),
        );
        assert_eq!(node["id"], "pg-1.pg.db.svc.cluster.local");
        // The replica leaves the SRV set: reads fall back to the primary after the TTL.
        dns.set_srv(SRV, &[(pg0, ports[0])], 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while read_port(&client).await != ports[0] {
            assert!(std::time::Instant::now() < deadline, "the replica is still used");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    sluice.assert_no_unexpected_errors(&[]);
}
