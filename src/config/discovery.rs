//! `[clusters.discovery]`: static addresses, Kubernetes EndpointSlices + Pods, or DNS.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Value;

use super::Fields;

/// `[clusters.discovery]`: where the nodes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// A fixed list of `host:port` addresses; roles are found by probing.
    Static(Vec<String>),
    /// EndpointSlices and Pods of a Kubernetes Service.
    Kubernetes(KubernetesDiscovery),
    /// SRV or A/AAAA records, re-resolved when their TTL runs out.
    Dns(DnsDiscovery),
}

/// `[clusters.discovery.kubernetes]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesDiscovery {
    pub namespace: String,
    /// The Services whose EndpointSlices (label `kubernetes.io/service-name`) list the nodes:
    /// `service = "pg-r"`, or a list such as `["acid-pg", "acid-pg-repl"]` for Patroni.
    pub services: Vec<String>,
    /// The endpoint port to connect to.
    pub port: PortRef,
    pub roles: RoleLabels,
    /// Narrows the Pod watch (default: every Pod of the namespace).
    pub pod_selector: Option<String>,
}

/// An EndpointSlice port, by name or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

/// Which Pod label says primary or replica.
#[derive(Debug, Clone, PartialEq)]
pub enum RoleLabels {
    /// `"cloudnative-pg"`, `"patroni"` or `"crunchy"`.
    Preset(String),
    Custom {
        label: String,
        primary: String,
        replica: String,
    },
}

/// The role label presets, in the order error messages list them.
pub const ROLE_PRESETS: [&str; 3] = ["cloudnative-pg", "patroni", "crunchy"];

/// `[clusters.discovery.dns]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsDiscovery {
    pub lookup: DnsLookup,
    /// Name servers to ask (`ip` or `ip:port`); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Bounds on the re-resolution period, which otherwise follows the records' TTL.
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

/// What to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsLookup {
    /// SRV records (`_postgres._tcp.pg.db.svc.cluster.local.`): targets and ports.
    Srv(String),
    /// A/AAAA records of `name`, each with `port`.
    Host { name: String, port: u16 },
}

pub(super) fn parse_discovery(mut d: Fields<'_>) -> Option<Discovery> {
    let present: Vec<&str> = ["static", "kubernetes", "dns"]
        .into_iter()
        .filter(|k| d.has(k))
        .collect();
    let out = match present.as_slice() {
        ["static"] => parse_static(&mut d),
        ["kubernetes"] => {
            let t = d.take_table("kubernetes")?;
            let path = d.key_path("kubernetes");
            parse_kubernetes(d.child(t, path)).map(Discovery::Kubernetes)
        }
        ["dns"] => {
            let t = d.take_table("dns")?;
            let path = d.key_path("dns");
            parse_dns(d.child(t, path)).map(Discovery::Dns)
        }
        [] => {
            d.error("", "needs one of `static`, `kubernetes` or `dns`");
            None
        }
        many => {
            d.error(
                "",
                &format!(
                    "set exactly one of `static`, `kubernetes` and `dns`, not {}",
                    many.join(" and ")
                ),
            );
            for k in many.iter().copied() {
                d.take(k);
            }
            None
        }
    };
    d.finish();
    out
}

fn parse_static(d: &mut Fields<'_>) -> Option<Discovery> {
    let addrs = d.string_array("static")?;
    let mut ok = true;
    if addrs.is_empty() {
        d.error("static", "must list at least one \"host:port\" address");
        ok = false;
    }
    for (i, a) in addrs.iter().enumerate() {
        if let Err(reason) = check_host_port(a) {
            d.error(&format!("static[{i}]"), &reason);
            ok = false;
        }
    }
    ok.then_some(Discovery::Static(addrs))
}

fn parse_kubernetes(mut k: Fields<'_>) -> Option<KubernetesDiscovery> {
    let namespace = k.string("namespace", None);
    let services = match k.take("service") {
        Some(Value::String(s)) if !s.is_empty() => Some(vec![s]),
        Some(Value::Array(items)) if !items.is_empty() => {
            let names: Vec<String> = items
                .iter()
                .filter_map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .collect();
            if names.len() == items.len() {
                Some(names)
            } else {
                k.error("service", "must be a list of non-empty Service names");
                None
            }
        }
        Some(_) => {
            k.error("service", "must be a Service name or a non-empty list of names");
            None
        }
        None => {
            k.error("service", "is required");
            None
        }
    };
    let port = match k.take("port") {
        Some(Value::String(s)) if !s.is_empty() => Some(PortRef::Name(s)),
        Some(Value::Integer(n)) if (1..=65535).contains(&n) => Some(PortRef::Number(n as u16)),
        Some(_) => {
            k.error("port", "must be a port name (string) or a number 1-65535");
            None
        }
        None => {
            k.error("port", "is required");
            None
        }
    };
    let roles = match k.take("roles") {
        Some(Value::String(s)) => {
            if ROLE_PRESETS.contains(&s.as_str()) {
                Some(RoleLabels::Preset(s))
            } else {
                k.error(
                    "roles",
                    &format!("unknown preset {s:?}; expected \"cloudnative-pg\", \"patroni\", \"crunchy\" or a table {{ label, primary, replica }}"),
                );
                None
            }
        }
        Some(Value::Table(t)) => {
            let path = k.key_path("roles");
            let mut r = k.child(t, path);
            let label = r.string("label", None);
            let primary = r.string("primary", None);
            let replica = r.string("replica", None);
            r.finish();
            Some(RoleLabels::Custom {
                label: label?,
                primary: primary?,
                replica: replica?,
            })
        }
        Some(_) => {
            k.error("roles", "must be a preset name or a table");
            None
        }
        None => Some(RoleLabels::Preset("cloudnative-pg".into())),
    };
    let pod_selector = k.optional_string("pod_selector");
    k.finish();
    Some(KubernetesDiscovery {
        namespace: namespace?,
        services: services?,
        port: port?,
        roles: roles?,
        pod_selector,
    })
}

fn parse_dns(mut d: Fields<'_>) -> Option<DnsDiscovery> {
    let srv = d.optional_string("srv");
    let name = d.optional_string("name");
    let port = match d.take("port") {
        None => None,
        Some(Value::Integer(n)) if (1..=65535).contains(&n) => Some(n as u16),
        Some(_) => {
            d.error("port", "must be a number 1-65535");
            return None;
        }
    };
    let lookup = match (srv, name, port) {
        (Some(srv), None, None) => Some(DnsLookup::Srv(srv)),
        (None, Some(name), Some(port)) => Some(DnsLookup::Host { name, port }),
        (None, Some(_), None) => {
            d.error(
                "port",
                "is required with `name` (SRV records carry their own ports)",
            );
            None
        }
        (Some(_), _, Some(_)) => {
            d.error(
                "port",
                "cannot be set with `srv`: SRV records carry their own ports",
            );
            None
        }
        (Some(_), Some(_), None) => {
            d.error("", "set `srv` or `name`, not both");
            None
        }
        (None, None, _) => {
            d.error(
                "",
                "needs `srv = \"_service._proto.name.\"` or `name = \"host.\"` with `port`",
            );
            None
        }
    };
    let nameservers = d.string_array("nameservers").map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| match parse_nameserver(s) {
                Some(a) => Some(a),
                None => {
                    d.error(
                        &format!("nameservers[{i}]"),
                        &format!("{s:?} is not an \"ip\" or \"ip:port\" address"),
                    );
                    None
                }
            })
            .collect::<Vec<_>>()
    });
    let min_refresh = d.duration("min_refresh", "1s");
    let max_refresh = d.duration("max_refresh", "30s");
    if let (Some(lo), Some(hi)) = (min_refresh, max_refresh) {
        if lo > hi {
            d.error("min_refresh", "must not be longer than max_refresh");
        }
    }
    d.finish();
    Some(DnsDiscovery {
        lookup: lookup?,
        nameservers: nameservers?,
        min_refresh: min_refresh?,
        max_refresh: max_refresh?,
    })
}

fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

pub(super) fn check_host_port(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => port
            .parse::<u16>()
            .map(|_| ())
            .map_err(|_| format!("{s:?} has an invalid port")),
        _ => Err(format!("{s:?} is not a \"host:port\" address")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::errors_of;
    use crate::config::Config;

    use super::*;

    fn cluster_with(discovery: &str) -> String {
        format!(
            "[[clusters]]\nname = \"pg\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:6433\"\n\
             [clusters.discovery]\n{discovery}\n\
             [[clusters.users]]\nname = \"app\"\npassword = \"x\"\n"
        )
    }

    fn discovery_of(text: &str) -> Discovery {
        Config::parse(text)
            .unwrap_or_else(|e| panic!("{e}"))
            .clusters
            .remove(0)
            .discovery
    }

    #[test]
    fn kubernetes_contract_shape_and_extensions() {
        let contract = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/contract/kubernetes.toml"
        ));
        if let Ok(text) = contract {
            let Discovery::Kubernetes(k) = discovery_of(&text) else {
                panic!("not kubernetes")
            };
            assert_eq!(k.services, ["pg-r"]);
            assert_eq!(k.port, PortRef::Name("postgres".into()));
            assert_eq!(k.roles, RoleLabels::Preset("cloudnative-pg".into()));
        }
        let d = discovery_of(&cluster_with(
            "kubernetes = { namespace = \"db\", service = [\"acid-pg\", \"acid-pg-repl\"], port = 5432, roles = \"patroni\", pod_selector = \"application=spilo\" }",
        ));
        let Discovery::Kubernetes(k) = d else {
            panic!("not kubernetes")
        };
        assert_eq!(k.services, ["acid-pg", "acid-pg-repl"]);
        assert_eq!(k.port, PortRef::Number(5432));
        assert_eq!(k.pod_selector.as_deref(), Some("application=spilo"));
    }

    #[test]
    fn dns_srv_and_host_forms() {
        let d = discovery_of(&cluster_with(
            "dns = { srv = \"_postgres._tcp.pg.db.svc.cluster.local.\", nameservers = [\"127.0.0.1:5353\", \"10.0.0.10\"] }",
        ));
        assert_eq!(
            d,
            Discovery::Dns(DnsDiscovery {
                lookup: DnsLookup::Srv("_postgres._tcp.pg.db.svc.cluster.local.".into()),
                nameservers: vec!["127.0.0.1:5353".parse().unwrap(), "10.0.0.10:53".parse().unwrap()],
                min_refresh: Duration::from_secs(1),
                max_refresh: Duration::from_secs(30),
            })
        );
        let d = discovery_of(&cluster_with(
            "dns = { name = \"pg.example.com.\", port = 5432, max_refresh = \"5s\" }",
        ));
        let Discovery::Dns(dns) = d else { panic!("not dns") };
        assert_eq!(
            dns.lookup,
            DnsLookup::Host {
                name: "pg.example.com.".into(),
                port: 5432
            }
        );
        assert_eq!(dns.max_refresh, Duration::from_secs(5));
    }

    #[test]
    fn discovery_errors_name_their_keys() {
        let errs = errors_of(&cluster_with("dns = { name = \"pg.\" }"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].discovery.dns.port:")),
            "{errs:?}"
        );
        let errs = errors_of(&cluster_with(
            "dns = { srv = \"_pg._tcp.x.\", port = 1, bogus = 2 }",
        ));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].discovery.dns.port:")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e == "clusters[0].discovery.dns.bogus: unknown key"),
            "{errs:?}"
        );
        let errs = errors_of(&cluster_with(
            "static = [\"127.0.0.1:1\"]\ndns = { name = \"pg.\", port = 1 }",
        ));
        assert!(errs.iter().any(|e| e.contains("exactly one")), "{errs:?}");
        let errs = errors_of(&cluster_with(
            "kubernetes = { namespace = \"db\", service = [], port = \"pg\", roles = \"stolon\" }",
        ));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].discovery.kubernetes.service:")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].discovery.kubernetes.roles:")),
            "{errs:?}"
        );
        let errs = errors_of(&cluster_with(
            "dns = { name = \"pg.\", port = 1, nameservers = [\"dns.local\"] }",
        ));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("clusters[0].discovery.dns.nameservers[0]:")),
            "{errs:?}"
        );
    }
}
