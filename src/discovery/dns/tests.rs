//! DNS discovery against a tiny DNS server on 127.0.0.1.

use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_apiserver::dns::FakeDns;

use super::*;
use crate::common::metrics::Metrics;
use crate::discovery::{dns_feed, Feed};

fn cfg(lookup: DnsLookup, server: SocketAddr) -> DnsDiscovery {
    DnsDiscovery {
        lookup,
        nameservers: vec![server],
        min_refresh: Duration::from_millis(200),
        max_refresh: Duration::from_secs(5),
    }
}

fn ids(feed: &Feed) -> Vec<(String, String)> {
    feed.members
        .borrow()
        .iter()
        .flatten()
        .map(|m| (m.id.clone(), m.address.clone()))
        .collect()
}

async fn expect(feed: &mut Feed, want: &[(&str, &str)], at: &str) {
    let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let ok = matches!(
        tokio::time::timeout(
            Duration::from_secs(6),
            feed.members.wait_for(|m| {
                m.iter()
                    .flatten()
                    .map(|m| (m.id.clone(), m.address.clone()))
                    .collect::<Vec<_>>()
                    == want
                    && m.is_some()
            })
        )
        .await,
        Ok(Ok(_))
    );
    assert!(ok, "{at}: members are {:?}, want {want:?}", ids(feed));
}

const SRV: &str = "_postgres._tcp.pg.db.svc.cluster.local.";
const PG0: &str = "pg-0.pg.db.svc.cluster.local.";
const PG1: &str = "pg-1.pg.db.svc.cluster.local.";

#[tokio::test]
async fn srv_targets_are_members_and_keep_their_id_across_ip_changes() {
    let dns = FakeDns::start().await.unwrap();
    dns.set_srv(SRV, &[(PG0, 5432), (PG1, 5433)], 1);
    dns.set_a(PG0, &[Ipv4Addr::new(127, 0, 0, 2)], 1);
    dns.set_a(PG1, &[Ipv4Addr::new(127, 0, 0, 3)], 1);
    let metrics = Arc::new(Metrics::new());
    let mut feed = dns_feed(&cfg(DnsLookup::Srv(SRV.into()), dns.addr()), &metrics)
        .await
        .unwrap();
    let id0 = "pg-0.pg.db.svc.cluster.local";
    let id1 = "pg-1.pg.db.svc.cluster.local";
    expect(
        &mut feed,
        &[(id0, "127.0.0.2:5432"), (id1, "127.0.0.3:5433")],
        "first lookup",
    )
    .await;
    // pg-1 restarts with a new IP: same member, new address, once the TTL (1 s) has run out.
    dns.set_a(PG1, &[Ipv4Addr::new(127, 0, 0, 9)], 1);
    expect(
        &mut feed,
        &[(id0, "127.0.0.2:5432"), (id1, "127.0.0.9:5433")],
        "after the TTL",
    )
    .await;
    // The records vanish (NXDOMAIN): the last members stay, and the failure shows.
    dns.set_srv(SRV, &[], 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while feed.status.failing().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failure is not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&feed).len(), 2, "members kept while DNS fails");
    assert!(metrics
        .encode()
        .contains("sluice_discovery_up{cluster=\"test\",source=\"dns\"} 0"));
    dns.set_srv(SRV, &[(PG0, 5432)], 1);
    expect(&mut feed, &[(id0, "127.0.0.2:5432")], "records back").await;
    assert!(feed.status.failing().is_none());
}

#[tokio::test]
async fn a_records_with_a_port_follow_the_ttl() {
    let dns = FakeDns::start().await.unwrap();
    dns.set_a(
        "pg.example.",
        &[Ipv4Addr::new(127, 0, 0, 5), Ipv4Addr::new(127, 0, 0, 6)],
        2,
    );
    let metrics = Arc::new(Metrics::new());
    let lookup = DnsLookup::Host {
        name: "pg.example.".into(),
        port: 6000,
    };
    let mut feed = dns_feed(&cfg(lookup, dns.addr()), &metrics).await.unwrap();
    expect(
        &mut feed,
        &[
            ("127.0.0.5:6000", "127.0.0.5:6000"),
            ("127.0.0.6:6000", "127.0.0.6:6000"),
        ],
        "lookup",
    )
    .await;
    // No new query before the 2 s TTL runs out, one soon after.
    let asked = dns.queries();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(dns.queries(), asked, "re-resolved before the TTL ran out");
    dns.set_a("pg.example.", &[Ipv4Addr::new(127, 0, 0, 7)], 2);
    expect(
        &mut feed,
        &[("127.0.0.7:6000", "127.0.0.7:6000")],
        "after the TTL",
    )
    .await;
}

#[tokio::test]
async fn the_system_resolver_is_the_default() {
    // No name servers configured: /etc/resolv.conf decides (nothing is looked up here).
    assert!(resolver(&[]).is_ok() || std::fs::metadata("/etc/resolv.conf").is_err());
}
