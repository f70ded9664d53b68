//! DNS discovery: SRV records (a headless Service's `_port._proto.name.namespace.svc…`) or
//! A/AAAA records plus a port, re-resolved when the answer's TTL runs out.
//!
//! An SRV target name (a StatefulSet pod's `pg-0.pg.db.svc.cluster.local.`) is the member's
//! id, so a pod that comes back with a new IP stays the same node. A failed lookup (no answer,
//! NXDOMAIN, a timeout) keeps the last member list: probes find out whether the nodes are
//! really gone.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::task::JoinHandle;

use super::{Publisher, StartError};
use crate::common::topology::Member;
use crate::config::{DnsDiscovery, DnsLookup};

/// A resolver that asks `nameservers` (UDP, then TCP), or the system's when there are none.
/// Its cache is off: every refresh asks again.
fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
    } else {
        let servers = nameservers
            .iter()
            .map(|sa| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// `ip:port`, with brackets around IPv6.
fn address(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// One lookup: the members and how long the answer is valid.
async fn lookup(resolver: &TokioResolver, what: &DnsLookup) -> Result<(Vec<Member>, Duration), String> {
    match what {
        DnsLookup::Host { name, port } => {
            let ips = resolver
                .lookup_ip(name.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let ttl = ips.valid_until().saturating_duration_since(Instant::now());
            let members = ips.iter().map(|ip| Member::at(&address(ip, *port))).collect();
            Ok((members, ttl))
        }
        DnsLookup::Srv(name) => {
            let srv = resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let mut ttl = srv.valid_until().saturating_duration_since(Instant::now());
            let mut members = Vec::new();
            for record in srv.answers() {
                let RData::SRV(s) = &record.data else { continue };
                // Addresses from the additional section, else a lookup of the target.
                let glued: Vec<IpAddr> = srv
                    .additionals()
                    .iter()
                    .filter(|r| r.name == s.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                let ip = match glued.first() {
                    Some(ip) => *ip,
                    None => {
                        let ips = resolver
                            .lookup_ip(s.target.clone())
                            .await
                            .map_err(|e| format!("SRV target {}: {e}", s.target))?;
                        ttl = ttl.min(ips.valid_until().saturating_duration_since(Instant::now()));
                        ips.iter()
                            .next()
                            .ok_or_else(|| format!("SRV target {} has no address", s.target))?
                    }
                };
                let target = s.target.to_utf8();
                members.push(Member {
                    id: target.trim_end_matches('.').to_string(),
                    ..Member::at(&address(ip, s.port))
                });
            }
            if members.is_empty() {
                return Err(format!("{name}: no SRV records"));
            }
            Ok((members, ttl))
        }
    }
}

/// Builds the resolver and starts re-resolving on TTL.
pub(super) async fn start(
    cluster: &str,
    cfg: &DnsDiscovery,
    publisher: Publisher,
) -> Result<JoinHandle<()>, StartError> {
    let resolver = resolver(&cfg.nameservers).map_err(|reason| StartError::Dns {
        cluster: cluster.into(),
        reason,
    })?;
    let cfg = cfg.clone();
    Ok(tokio::spawn(async move {
        let mut retry = cfg.min_refresh;
        loop {
            let wait = match lookup(&resolver, &cfg.lookup).await {
                Ok((members, ttl)) => {
                    publisher.publish(members);
                    retry = cfg.min_refresh;
                    ttl.clamp(cfg.min_refresh, cfg.max_refresh)
                }
                Err(e) => {
                    publisher.status.failed(&e);
                    let wait = retry;
                    retry = (retry * 2).min(cfg.max_refresh);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }))
}

#[cfg(test)]
mod tests;
