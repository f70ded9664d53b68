//! Names what is wrong when a Kubernetes source yields fewer members than it should: a
//! Service without EndpointSlices (wrong namespace or name), a port the slices do not have.

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::{KubernetesDiscovery, PortRef};

/// The label the EndpointSlice controllers put on each slice of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// One message per configured Service that contributes no member, saying why, naming the
/// Service, the namespace and the port. Empty when every Service has usable endpoints.
pub fn problems<'a>(
    cfg: &KubernetesDiscovery,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
) -> Vec<String> {
    let mut out = Vec::new();
    for service in &cfg.services {
        let mine: Vec<&EndpointSlice> = slices
            .clone()
            .into_iter()
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_LABEL))
                    .is_some_and(|v| v == service)
            })
            .collect();
        if mine.is_empty() {
            out.push(format!(
                "no EndpointSlice labelled {SERVICE_LABEL}={service} in namespace {}",
                cfg.namespace
            ));
            continue;
        }
        let endpoints = mine.iter().map(|s| s.endpoints.len()).sum::<usize>();
        if endpoints == 0 {
            out.push(format!(
                "the EndpointSlices of {service} in namespace {} list no endpoints (no running pod matches the Service)",
                cfg.namespace
            ));
            continue;
        }
        if mine.iter().any(|s| super::slice_port(s, &cfg.port).is_some()) {
            continue;
        }
        let mut have: Vec<String> = mine
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| match (&cfg.port, &p.name, p.port) {
                (PortRef::Name(_), Some(name), _) if !name.is_empty() => name.clone(),
                (_, _, Some(port)) => port.to_string(),
                (_, name, None) => name.clone().unwrap_or_default(),
            })
            .collect();
        have.sort();
        have.dedup();
        let want = match &cfg.port {
            PortRef::Name(n) => n.clone(),
            PortRef::Number(n) => n.to_string(),
        };
        out.push(format!(
            "slices of {service} have ports [{}], not {want}",
            have.join(", ")
        ));
    }
    out
}
